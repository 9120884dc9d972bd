from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from formula_foundry.errors import ValidationError
from formula_foundry.substrate import Digest, InvalidDigest
from formula_foundry.substrate.digest import sha256_file

HEX = "ab" * 32


def test_parse_and_str_round_trip() -> None:
    digest = Digest.parse(f"sha256:{HEX}")
    assert digest.hexdigest == HEX
    assert str(digest) == f"sha256:{HEX}"
    assert digest == Digest(HEX)
    assert hash(digest) == hash(Digest(HEX))


@pytest.mark.parametrize(
    "text",
    [
        "",
        HEX,  # no algorithm
        f"sha256:{HEX.upper()}",
        f"SHA256:{HEX}",
        f"md5:{HEX}",
        f"sha256:{HEX[:-1]}",
        f"sha256:{HEX}0",
        f"sha256: {HEX}",
        f"sha256:{HEX}\n",
        f"sha256:{'g' * 64}",
    ],
)
def test_parse_rejects_malformed(text: str) -> None:
    with pytest.raises(InvalidDigest) as info:
        Digest.parse(text)
    assert repr(text) in str(info.value)
    assert isinstance(info.value, ValidationError)


def test_parse_rejects_non_str() -> None:
    with pytest.raises(InvalidDigest, match="expected a str"):
        Digest.parse(b"sha256:" + HEX.encode())  # type: ignore[arg-type]


@given(st.binary(max_size=256))
def test_of_bytes_matches_hashlib_and_round_trips(data: bytes) -> None:
    digest = Digest.of_bytes(data)
    assert digest.hexdigest == hashlib.sha256(data).hexdigest()
    assert Digest.parse(str(digest)) == digest


@given(st.text(max_size=80))
def test_arbitrary_text_is_parsed_only_when_canonical(text: str) -> None:
    canonical = (
        text.startswith("sha256:")
        and len(text) == 71
        and all(c in "0123456789abcdef" for c in text[7:])
    )
    if canonical:
        assert str(Digest.parse(text)) == text
    else:
        with pytest.raises(InvalidDigest):
            Digest.parse(text)


def test_sha256_file_streams_large_file(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    data = bytes(range(256)) * 40_000  # > 2 chunks of 4 MiB
    path.write_bytes(data)
    digest, size = sha256_file(path)
    assert size == len(data)
    assert digest.hexdigest == hashlib.sha256(data).hexdigest()
