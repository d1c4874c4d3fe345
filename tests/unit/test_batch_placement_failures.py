"""Batch on Kubernetes: CPU-job placement from the queue configuration, and why a job failed.

Pure: the queue configuration's ``cpu_placement`` (validation, and what it adds
to a CPU job's pod and not to a GPU or offloaded one), the failed-job message
built from the Job's pods (``kube.failure_message``), and the CLI's ``status``
printing that reason on stderr while stdout keeps the one word Snakemake reads.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from labfleet_batch import client as batch_client
from labfleet_batch import jobs, queues
from labfleet_batch.kube import failure_message
from labfleet_batch.validation import validate_request
from labfleet_spawner.catalogue import load_catalogue

ROOT = Path(__file__).resolve().parents[2]
CATALOGUE = load_catalogue(ROOT / "config" / "catalogue.yaml")
REAL = {"labfleet.io/real-node": "true"}
REAL_TOLERATION = {
    "key": "labfleet.io/real-node",
    "operator": "Equal",
    "value": "true",
    "effect": "NoSchedule",
}


def config(**extra):
    groups = {"ml": {"cpu": 8, "memory": "32Gi", "accelerators": {"t4": 1}}}
    return queues.parse_queue_config(
        {"groups": groups, "offload": {"enabled": True}, **extra}, CATALOGUE
    )


def pod_of(qconfig, raw: dict) -> dict:
    req = validate_request(
        {"command": ["true"], **raw},
        catalogue=CATALOGUE,
        user_groups=["ml"],
        queue_groups=qconfig.covered_accelerators(),
        priorities=qconfig.priorities,
        offload_available=qconfig.offload_enabled,
    )
    ctx = jobs.JobContext(
        user="alice",
        namespace=qconfig.namespace("ml"),
        queue=qconfig.local_queue("ml"),
        priority_class=qconfig.priority_class(req.priority),
        kind_tolerations=qconfig.kind_tolerations,
        catalogue=CATALOGUE,
        cpu_node_selector=qconfig.cpu_node_selector,
        cpu_tolerations=qconfig.cpu_tolerations,
    )
    return jobs.make_job(req, ctx, "j-abc12345")["spec"]["template"]["spec"]


def test_cpu_placement_goes_to_cpu_jobs_only():
    qconfig = config(cpu_placement={"node_selector": REAL, "tolerations": [REAL_TOLERATION]})
    assert qconfig.cpu_node_selector == REAL
    assert qconfig.cpu_tolerations == (REAL_TOLERATION,)
    cpu = pod_of(qconfig, {})
    assert cpu["nodeSelector"] == REAL
    assert REAL_TOLERATION in cpu["tolerations"]
    # the group's reserved-node toleration is still there
    assert any(t.get("key") == "reserved" for t in cpu["tolerations"])
    gpu = pod_of(qconfig, {"accelerator": "t4"})
    assert "nodeSelector" not in gpu and REAL_TOLERATION not in gpu["tolerations"]
    offload = pod_of(qconfig, {"offload": True})
    assert "nodeSelector" not in offload and REAL_TOLERATION not in offload["tolerations"]
    # the default flavor stays free of it: it also holds the CPU of GPU jobs
    default = queues.flavor_objects(qconfig, CATALOGUE)[0]
    assert default["metadata"]["name"] == qconfig.default_flavor() and default["spec"] == {}


def test_without_cpu_placement_nothing_changes():
    pod = pod_of(config(), {})
    assert "nodeSelector" not in pod
    assert [t for t in pod["tolerations"] if t.get("key") != "reserved"] == []


def test_cpu_placement_defaults_and_exists_toleration():
    qconfig = config(cpu_placement={"tolerations": [{"key": "pool", "operator": "Exists"}]})
    assert qconfig.cpu_node_selector == {}
    assert qconfig.cpu_tolerations == ({"key": "pool", "operator": "Exists"},)


@pytest.mark.parametrize(
    "placement, words",
    [
        ("real", "must be a mapping"),
        ({"nodes": {}}, "unknown field(s) nodes; allowed: node_selector, tolerations"),
        ({"node_selector": ["a"]}, "node_selector: must be a mapping"),
        ({"node_selector": {"bad key!": "x"}}, "'bad key!' is not a valid label key"),
        ({"node_selector": {"a/b/c": "x"}}, "is not a valid label key"),
        ({"node_selector": {"labfleet.io/real-node": True}}, "quote true/false"),
        ({"node_selector": {"k": "x" * 64}}, "is not a valid label value"),
        ({"tolerations": {"key": "a"}}, "tolerations: must be a list"),
        ({"tolerations": ["a"]}, "tolerations[0]: must be a mapping"),
        ({"tolerations": [{"key": "a", "colour": "x"}]}, "unknown field(s) colour"),
        ({"tolerations": [{"key": "a", "operator": "In"}]}, "'In' is not one of Equal, Exists"),
        ({"tolerations": [{"value": "x"}]}, "without a key needs operator Exists"),
        ({"tolerations": [{"key": "a", "operator": "Exists", "value": "x"}]}, "takes no value"),
        ({"tolerations": [{"key": "a", "effect": "NoRun"}]}, "'NoRun' is not one of NoSchedule"),
        (
            {"tolerations": [{"key": "a", "effect": "NoSchedule", "tolerationSeconds": 5}]},
            "only with effect NoExecute",
        ),
    ],
)
def test_cpu_placement_errors_name_the_field(placement, words):
    with pytest.raises(queues.QueueConfigError) as e:
        config(cpu_placement=placement)
    assert "cpu_placement" in str(e.value) and words in str(e.value), str(e.value)


# -- why a job failed ------------------------------------------------------------------------


def failed_job(reason: str = "BackoffLimitExceeded", message: str = "backoff") -> dict:
    cnd = {"type": "Failed", "status": "True", "reason": reason, "message": message}
    return {"metadata": {"name": "j"}, "spec": {}, "status": {"conditions": [cnd]}}


def pod(index: int, terminated: dict | None, memory: str | None = "64Mi", created="t1", **status):
    limits = {"memory": memory} if memory else {}
    statuses = [{"name": "job", "state": {"terminated": terminated}}] if terminated else []
    return {
        "metadata": {
            "labels": {"batch.kubernetes.io/job-completion-index": str(index)},
            "creationTimestamp": created,
        },
        "spec": {"containers": [{"name": "job", "resources": {"limits": limits}}]},
        "status": {"phase": "Failed", "containerStatuses": statuses, **status},
    }


OOM = {"reason": "OOMKilled", "exitCode": 137}


def test_oom_killed_completion_in_a_plain_sentence():
    assert failure_message(failed_job(), [pod(0, OOM)]) == (
        "completion 0 was killed: it used more than its 64Mi memory limit (OOMKilled)"
    )
    assert failure_message(failed_job(), [pod(2, OOM, memory=None)]) == (
        "completion 2 was killed by the kernel: out of memory (OOMKilled)"
    )


def test_exit_codes_signals_and_pod_reasons():
    pods = [
        pod(1, {"reason": "Error", "exitCode": 3}),
        pod(0, {"reason": "Error", "exitCode": 143}),
        pod(2, None, reason="Evicted", message="The node was low on resource: memory."),
        pod(3, {"reason": "Completed", "exitCode": 0}, phase="Succeeded"),
    ]
    assert failure_message(failed_job(), pods) == (
        "completion 0 was ended by signal 15; completion 1 exited with code 3; "
        "completion 2 failed: The node was low on resource: memory."
    )


def test_latest_pod_of_a_completion_counts_and_long_lists_are_cut():
    older = pod(0, {"reason": "Error", "exitCode": 1}, created="t1")
    newer = pod(0, OOM, created="t2")
    assert failure_message(failed_job(), [newer, older]).startswith("completion 0 was killed")
    many = [pod(i, {"reason": "Error", "exitCode": 1}) for i in range(8)]
    text = failure_message(failed_job(), many)
    assert text.count("exited with code 1") == 5 and text.endswith("; and 3 more failed")


def test_job_own_reason_is_kept():
    # a deadline kills the pods too: the Job's message says why, not the signal
    job = failed_job("DeadlineExceeded", "Job was active longer than specified deadline")
    assert failure_message(job, [pod(0, {"reason": "Error", "exitCode": 137})]) is None
    assert failure_message(failed_job(), []) is None  # no pods left: the Job's own message


class FakeClient:
    def __init__(self, job):
        self.job = job

    def status(self, job_id):
        return self.job


def test_cli_status_prints_the_word_and_the_reason_on_stderr(capsys):
    reason = "completion 0 was killed: it used more than its 64Mi memory limit (OOMKilled)"
    job = {"id": "ml/j", "state": "failed", "snakemake_status": "failed", "message": reason}
    assert batch_client.main(["status", "ml/j"], client=FakeClient(job)) == 0
    out, err = capsys.readouterr()
    assert out == "failed\n"
    assert err == f"ml/j: failed ({reason})\n"
    job = {"id": "ml/j", "state": "running", "snakemake_status": "running", "message": ""}
    batch_client.main(["status", "ml/j"], client=FakeClient(job))
    out, err = capsys.readouterr()
    assert (out, err) == ("running\n", "")
