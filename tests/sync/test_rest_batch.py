"""``log_batch`` toward a server sends exactly the request MLflow's client would send.

``formula_foundry.sync.mlflow.rest_batch`` encodes the ``LogBatch`` JSON itself (orjson) instead of
going through protobuf. Two checks: for arbitrary batches, the server-side parse of our body
is the very message MLflow's ``RestStore`` would have sent; and on the session's real
``mlflow server``, a batch sent both ways leaves identical runs, with MLflow's own refusals
(param conflict, missing run) still classified as before.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from formula_foundry.sync.engine.sink import DestinationRejected, MetricRow, StoredParamConflict
from formula_foundry.sync.mlflow.client_sink import MlflowSink
from formula_foundry.sync.mlflow.rest_batch import log_batch_body
from tests._keys import accepted_key

from .conftest import HttpService

INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"))


# Keys the tracker lets into a spool (MLflow's rules: e.g. no "a/" or "a//b").
KEY = st.from_regex(r"[a-zA-Z][a-zA-Z0-9_\-. /:]{0,19}", fullmatch=True).filter(accepted_key)
METRICS = st.lists(
    st.tuples(
        KEY,
        st.floats(allow_nan=True, allow_infinity=True)
        | st.sampled_from(
            [math.nan, math.inf, -math.inf, 0.0, -0.0, 5e-324, 1.7976931348623157e308]
        ),
        st.integers(min_value=0, max_value=2**63 - 1),
        INT64,
    ),
    max_size=30,
)
PAIRS = st.lists(st.tuples(KEY, TEXT), max_size=8)


def _mlflow_request(run_id: str, metrics: list[MetricRow], params, tags):  # type: ignore[no-untyped-def]
    """The message MLflow's RestStore.log_batch sends, as the server parses it."""
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.protos.service_pb2 import LogBatch
    from mlflow.utils.proto_json_utils import message_to_json, parse_dict

    sent = LogBatch(
        run_id=run_id,
        metrics=[Metric(k, v, t, s).to_proto() for k, v, t, s in metrics],
        params=[Param(k, v).to_proto() for k, v in params],
        tags=[RunTag(k, v).to_proto() for k, v in tags],
    )
    parsed = LogBatch()
    parse_dict(json.loads(message_to_json(sent)), parsed)
    return parsed


@settings(max_examples=300, deadline=None)
@given(
    run_id=st.text("0123456789abcdef", min_size=32, max_size=32),
    metrics=METRICS,
    params=PAIRS,
    tags=PAIRS,
)
def test_the_body_parses_into_the_message_mlflow_sends(
    run_id: str,
    metrics: list[MetricRow],
    params: list[tuple[str, str]],
    tags: list[tuple[str, str]],
) -> None:
    from mlflow.protos.service_pb2 import LogBatch
    from mlflow.utils.proto_json_utils import parse_dict

    ours = LogBatch()
    parse_dict(json.loads(log_batch_body(run_id, metrics, params, tags)), ours)
    reference = _mlflow_request(run_id, metrics, params, tags)
    # Bytes, not ==: NaN must be NaN on both sides and -0.0 must keep its sign.
    assert ours.SerializeToString(deterministic=True) == reference.SerializeToString(
        deterministic=True
    )


# -- against the session's real mlflow server -----------------------------------------------


def _history(client, run_id: str) -> dict[str, object]:  # type: ignore[no-untyped-def]
    run = client.get_run(run_id)
    metrics = {
        key: sorted(
            (m.step, m.timestamp, repr(m.value)) for m in client.get_metric_history(run_id, key)
        )
        for key in run.data.metrics
    }
    tags = {k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.")}
    return {"metrics": metrics, "params": run.data.params, "tags": tags}


def _both_ways(client, exp_id: str, sink: MlflowSink, metrics, params, tags) -> None:  # type: ignore[no-untyped-def]
    """One batch through MLflow's client into one run, through ``sink`` into another: the
    two runs hold the same."""
    from mlflow.entities import Metric, Param, RunTag

    theirs = client.create_run(exp_id).info.run_id
    client.log_batch(
        theirs,
        metrics=[Metric(k, v, t, s) for k, v, t, s in metrics],
        params=[Param(k, v) for k, v in params],
        tags=[RunTag(k, v) for k, v in tags],
    )
    ours = client.create_run(exp_id).info.run_id
    sink.log_batch(ours, metrics, params, tags)
    assert _history(client, ours) == _history(client, theirs)


@pytest.mark.server
def test_a_server_stores_the_same_either_way(http_service: HttpService, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=http_service.uri)
    exp = client.create_experiment(f"rest-batch-{tmp_path.name}")
    sink = MlflowSink(http_service.uri, tmp_path / "art")
    assert sink._post_batch is not None  # the fast path is the one under test

    examples = [
        (
            [
                ("loss", 0.5, 1_700_000_000_000, 0),
                ("loss", math.nan, 1_700_000_000_001, 1),
                ("loss", math.inf, 1_700_000_000_002, 2),
                ("loss", -math.inf, 1_700_000_000_003, 3),
                ("loss", -0.0, 1_700_000_000_004, -4),
                ("a/b c:d", 5e-324, 0, 2**63 - 1),
            ],
            [("lr", "0.1"), ("ünï cödé", '✓ "quoted" \\ back\nslash')],
            [("phase", "ένα"), ("empty", "")],
        ),
        ([("only", 1.0, 1, 1)] * 3, [], []),
        ([], [("p", "x" * 6000)], [("t", "y" * 8000)]),
    ]
    for metrics, params, tags in examples:
        _both_ways(client, exp, sink, metrics, params, tags)

    # MLflow's refusals come back as before: a changed param, a run that does not exist.
    run_id = client.create_run(exp).info.run_id
    sink.log_batch(run_id, [], [("lr", "0.1")], [])
    sink.log_batch(run_id, [], [("lr", "0.1")], [])  # the same value again: accepted
    with pytest.raises(StoredParamConflict):
        sink.log_batch(run_id, [], [("lr", "0.2")], [])
    with pytest.raises(DestinationRejected, match="0" * 32):
        sink.log_batch("0" * 32, [("m", 1.0, 1, 0)], [], [])
    assert client.get_run(run_id).data.params == {"lr": "0.1"}


def test_other_stores_keep_mlflows_path(tmp_path: Path) -> None:
    sink = MlflowSink(f"sqlite:///{tmp_path / 's.db'}", tmp_path / "art")
    assert sink._post_batch is None


@pytest.mark.server
@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(metrics=METRICS, params=PAIRS, tags=PAIRS)
def test_random_batches_on_a_server(
    http_service: HttpService,
    tmp_path: Path,
    metrics: list[MetricRow],
    params: list[tuple[str, str]],
    tags: list[tuple[str, str]],
) -> None:
    """Arbitrary batches, both ways, into the real server: the same run content."""
    from mlflow import MlflowClient

    params = list(dict(params).items())  # one value per key within a batch, as ff-sync sends
    tags = list(dict(tags).items())
    client = MlflowClient(tracking_uri=http_service.uri)
    name = f"rest-batch-random-{tmp_path.name}"
    exp = client.get_experiment_by_name(name)
    exp_id = exp.experiment_id if exp else client.create_experiment(name)
    sink = MlflowSink(http_service.uri, tmp_path / "art")
    _both_ways(client, exp_id, sink, metrics, params, tags)
