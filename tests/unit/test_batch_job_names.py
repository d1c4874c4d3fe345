"""A job submitted without a name is called after what it runs (it was always ``job``)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from labfleet_batch import queues
from labfleet_batch.names import default_job_name
from labfleet_batch.validation import JOB_NAME_PATTERN, validate_request
from labfleet_spawner.catalogue import load_catalogue

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("command", "name"),
    [
        (["python", "train.py", "--lr", "1e-3"], "train"),
        (["python3", "-m", "mypkg.fit"], "mypkg-fit"),
        (["/usr/bin/env", "OMP_NUM_THREADS=4", "python", "src/Eval_Model.py"], "eval-model"),
        (["torchrun", "--nproc-per-node", "4", "train_big.py"], "train-big"),
        (["mpirun", "-n", "8", "./simulate"], "simulate"),
        (["timeout", "60", "Rscript", "analysis.R"], "analysis"),
        (["bash", "-c", "cd ~/project && python fit.py"], "fit"),
        (["./run.sh"], "run"),
        (["sleep", "60"], "sleep"),
        (["python", "-c", "print(1)"], "python"),
        (["X=1"], "job"),
    ],
)
def test_commands(command, name):
    assert default_job_name(command) == name


@pytest.mark.parametrize(
    ("script", "name"),
    [
        ("python train.py --epochs 3\n", "train"),
        ("#!/bin/bash\n# prepare\nset -e\ncd ~/p\nmodule load cuda\npython fit.py\n", "fit"),
        ("echo starting; python3 -m lab.sweep --n 10 | tee out.log\n", "lab-sweep"),
        (
            '#!/bin/sh\n# properties = {"type": "single", "rule": "align_reads"}\n'
            "cd /w && python -m snakemake --allowed-rules align_reads\n",
            "align-reads",
        ),
        ("#!/usr/bin/env python3\nimport numpy\n", "python3"),
        ("echo hello\necho done > out.txt\n", "echo"),  # nothing but setup: the first one
        ('echo "unbalanced\n', "echo"),
        ("# only a comment\n", "job"),
    ],
)
def test_scripts(script, name):
    assert default_job_name(script=script) == name


def test_names_are_always_valid_job_names():
    odd = ["Ünïcode Ü.py", "-" * 80, "a" * 80 + ".py", "...", "9lives.py", "UPPER_case.SH"]
    for arg in odd:
        name = default_job_name(["python", arg])
        assert re.match(JOB_NAME_PATTERN, name), (arg, name)
    assert default_job_name(["python", "a" * 80 + ".py"]) == "a" * 32


def test_an_unnamed_submission_gets_its_command_s_name_and_a_given_name_wins():
    catalogue = load_catalogue(ROOT / "config" / "catalogue.yaml")
    qconfig = queues.parse_queue_config({"groups": {"ml": {"cpu": 8, "memory": "32Gi"}}}, catalogue)

    def validate(raw):
        return validate_request(
            raw,
            catalogue=catalogue,
            user_groups=["ml"],
            queue_groups=qconfig.covered_accelerators(),
            priorities=qconfig.priorities,
        )

    assert validate({"command": ["python", "train.py"]}).name == "train"
    assert validate({"script": "python eval.py\n"}).name == "eval"
    assert validate({"command": ["python", "train.py"], "name": "run-7"}).name == "run-7"
    assert validate({"command": ["python", "train.py"], "name": ""}).name == "train"
