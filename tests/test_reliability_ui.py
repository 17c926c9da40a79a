"""The fault matrix of docs/reliability.md for `tuneforge ui`: what a hostile form, request, runs folder
or command line does to the page, what the page answers, and that it acts only inside its runs and
data folders, and only on processes it started."""

from __future__ import annotations

import fcntl
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
import yaml

from test_reliability import one_line
from tuneforge import cli

uvicorn = pytest.importorskip("uvicorn")
from test_ui import LOCAL, TOKEN, client, fake_run, folders, lora_form  # noqa: E402, F401 (folders: a fixture)


def refused(response, status: int, *words: str) -> str:
    """The API's one line for a refused request, holding ``words``."""
    assert response.status_code == status, (response.status_code, response.text)
    error = response.json()["error"]
    assert "\n" not in error and all(w in error for w in words), error
    return error


def test_a_form_key_cannot_move_a_run_out_of_the_runs_folder(folders, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    adapter = elsewhere / "adapter"
    adapter.mkdir()
    with client(folders) as c:
        for key, value, words in [("train", f"{{output_dir: {elsewhere / 'run'}}}", "no such setting"),
                                  ("data", "{path: data/reviews.jsonl}", "no such setting"),
                                  ("train.output_dir", str(elsewhere / "run"), "the page sets it"),
                                  ("method.alpha", "1", "no such setting for method lora"),
                                  ("train.start_from", str(adapter), "outside the folders this page may read")]:
            for route in ("/api/resolve", "/api/start"):
                r = c.post(route, json={"name": "a", "form": lora_form(**{key: value})})
                refused(r, 400, words)
                assert r.json()["key"] == key
        r = c.post("/api/resolve", json={"name": "a", "form": lora_form(**{"data.max_length": {"a": 1}})})
        assert refused(r, 400, "expected text") and r.json()["key"] == "data.max_length"
    assert list(elsewhere.iterdir()) == [adapter] and not list(adapter.iterdir())
    assert not (folders / "runs" / "a").exists() and not (folders / "runs" / ".ui" / "a").exists()


VICTIM = """
import signal, sys, time
signal.signal(signal.SIGINT, lambda *_: open(sys.argv[1], "w").write("interrupted"))
print("ready", flush=True)
time.sleep(60)
"""


def test_stop_signals_only_a_process_the_page_started(folders):
    """A planted lock naming another process, held (as a planter can hold it) by a third: Stop leaves both be."""
    marker = folders / "interrupted.txt"
    victim = subprocess.Popen([sys.executable, "-c", VICTIM, str(marker)], stdout=subprocess.PIPE, text=True)
    try:
        assert victim.stdout.readline().strip() == "ready"
        folder = fake_run(folders, "planted", {".tuneforge.lock": f"{victim.pid}\n"})
        fd = os.open(folder / ".tuneforge.lock", os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        try:
            with client(folders) as c:
                refused(c.post("/api/runs/planted/stop", json={}), 400, "not started by this page", "Ctrl-C")
                run = c.get("/api/runs/planted").json()
                assert run["status"] == "running" and run["stoppable"] is False
                refused(c.post("/api/runs/planted/resume", json={}), 400, "still running")
            time.sleep(0.3)
            assert victim.poll() is None and not marker.exists()
        finally:
            os.close(fd)
    finally:
        victim.kill()
        victim.wait()


def test_a_link_or_fifo_in_the_runs_folder_is_not_followed(folders, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    (elsewhere / "secret.txt").write_text("the secret\n")
    outside_run = elsewhere / "run"
    outside_run.mkdir()
    (outside_run / "config.yaml").write_text("method: lora\n")
    (outside_run / "checkpoints" / "step-0000002").mkdir(parents=True)
    (outside_run / "checkpoints" / "step-0000002" / "state.json").write_text("{}")
    (folders / "runs").mkdir()
    (folders / "runs" / "linked").symlink_to(outside_run)
    real = fake_run(folders, "real")
    (real / "config.yaml").unlink()
    (real / "config.yaml").symlink_to(elsewhere / "secret.txt")
    (real / "metrics.jsonl").symlink_to(elsewhere / "secret.txt")
    os.mkfifo(fake_run(folders, "fifo") / "summary.json")  # a read would wait for a writer forever
    with client(folders) as c:
        assert {r["name"] for r in c.get("/api/runs").json()["runs"]} == {"real", "fifo"}
        refused(c.get("/api/runs/linked"), 400, "runs/linked: a link, which this page does not follow")
        refused(c.post("/api/runs/linked/resume", json={}), 400, "a link")
        detail = c.get("/api/runs/real")
        assert detail.status_code == 200 and "secret" not in detail.text and detail.json()["config"] is None
        assert c.get("/api/runs/fifo").json()["status"] == "failed"
    assert not (folders / "runs" / ".ui" / "linked").exists() and sorted(p.name for p in outside_run.iterdir()) == \
        ["checkpoints", "config.yaml"]

    # RUNS/.ui, where the page writes what it launches, as a link: nothing is written through it
    side = tmp_path_factory.mktemp("side")
    (folders / "runs" / ".ui").symlink_to(side)
    with client(folders) as c:
        refused(c.post("/api/start", json={"name": "new", "form": lora_form()}), 400, "runs/.ui: a link")
        refused(c.get("/api/runs"), 400, "runs/.ui: a link")
    assert not list(side.iterdir()) and not (folders / "runs" / "new").exists()


def test_try_and_resume_check_the_files_a_runs_config_names(folders, tiny_dir):
    """A run folder whose config.yaml names a model or data outside the folders (``tiny_dir`` lies outside)."""
    outside = {"model": str(tiny_dir), "method": {"name": "lora"},
               "data": {"path": "data/reviews.jsonl", "format": "classification"}}
    folder = fake_run(folders, "planted", {"final/adapter_config.json": "{}",
                                           "checkpoints/step-0000002/state.json": "{}"})
    (folder / "config.yaml").write_text(yaml.safe_dump(outside))
    with client(folders) as c:
        assert c.get("/api/try/planted").status_code == 405  # a GET (an <img> on any site) loads nothing
        refused(c.post("/api/try/planted", json={}), 400,
                "runs/planted/config.yaml: key 'model'", "outside the folders this page may read")
        refused(c.post("/api/runs/planted/resume", json={}), 400, "runs/planted/config.yaml: key 'model'")
        (folder / "config.yaml").write_text(yaml.safe_dump({**outside, "model": "data/tiny",
                                                            "data": {"path": str(tiny_dir / "config.json")}}))
        refused(c.post("/api/runs/planted/resume", json={}), 400, "key 'data.path'", "outside the folders")
        (folder / "config.yaml").write_text(yaml.safe_dump({**outside, "model": "data/tiny"}))
        (folder / "final" / "adapter_model.safetensors").symlink_to(tiny_dir / "model.safetensors")
        refused(c.post("/api/try/planted", json={}), 400, "runs/planted/final/adapter_model.safetensors: a link")
    assert not (folders / "runs" / ".ui" / "planted").exists()  # nothing was launched


def test_requests_that_act_need_the_pages_token_header_and_origin(folders, capsys, monkeypatch):
    form = {"name": "a", "form": lora_form()}
    with client(folders) as c:
        r = c.post("/api/start", json=form, headers={"Origin": "http://attacker.example"})
        assert r.status_code == 403 and "another site" in r.text
        r = c.post("/api/start", json=form, headers={"Origin": f"{LOCAL}:8000"})  # another port is another origin
        assert r.status_code == 403
        assert c.get(f"/?token={TOKEN}").status_code == 200  # the printed address: the cookie is set
        r = c.post("/api/start", json=form, headers={"X-Tuneforge-Token": ""})
        assert r.status_code == 401 and "X-Tuneforge-Token" in r.text  # the cookie alone acts on nothing
        assert c.post("/api/resolve", json=form, headers={"Origin": LOCAL}).status_code == 200
    assert not (folders / "runs" / "a").exists() and not (folders / "runs" / ".ui" / "a").exists()

    # on 127.0.0.1 too the printed address carries a token, and without it the page answers 401
    servers = []

    class Kept(uvicorn.Server):  # `tuneforge ui` in a thread of this process, kept to be stopped
        def __init__(self, cfg):
            super().__init__(cfg)
            servers.append(self)

    monkeypatch.setattr(uvicorn, "Server", Kept)
    codes = []
    thread = threading.Thread(target=lambda: codes.append(cli.main(["ui", "--port", "0"])))
    thread.start()
    try:
        address, deadline = None, time.monotonic() + 30
        while address is None and time.monotonic() < deadline:
            time.sleep(0.05)
            address = re.search(r"(http://127\.0\.0\.1:\d+/)\?token=([\w-]{20,})\n", capsys.readouterr().out)
        assert address, "no address printed"
        base, token = address.groups()
        with pytest.raises(urllib.error.HTTPError) as no_token:
            urllib.request.urlopen(base + "api/runs", timeout=30)
        assert no_token.value.code == 401
        with urllib.request.urlopen(urllib.request.Request(base + "api/runs", headers={"X-Tuneforge-Token": token}),
                                    timeout=30) as ok:
            assert json.load(ok)["runs"] == []
    finally:
        while thread.is_alive() and not servers:
            time.sleep(0.05)
        if servers:
            servers[0].should_exit = True
        thread.join(30)
    assert codes == [0]


def test_a_request_body_over_the_cap_is_refused_at_once(folders):
    big = {"name": "a", "form": lora_form(**{"data.instruction": "x" * 20_000_000})}
    with client(folders) as c:
        started = time.monotonic()
        r = c.post("/api/resolve", json=big)
        assert r.status_code == 413 and time.monotonic() - started < 5
        chunks = (b'{"name": "a", "form": {"data.instruction": "' + b"x" * 65536 for _ in range(40))
        refused(c.post("/api/resolve", content=chunks, headers={"Content-Type": "application/json"}), 413,
                "over 1048576 bytes")
        assert c.post("/api/resolve", json={"name": "a", "form": lora_form()}).status_code == 200


def test_malformed_form_values_and_requests_get_a_clear_4xx(folders):
    with client(folders) as c:
        for key, value, words in [("data.path", "data/re\0views.jsonl", "NUL"), ("model", "data/\0", "NUL"),
                                  ("data.eval_path", "\0", "NUL"), ("method.r", "5" * 5000, "digits"),
                                  ("train.learning_rate", "1" * 5000, "digits"),
                                  ("method.target_modules", "[" * 700 + "]" * 700, "nested"),
                                  ("data.verbalizer", "{a: " + "[" * 700 + "]" * 700 + "}", "nested")]:
            r = c.post("/api/resolve", json={"name": "a", "form": lora_form(**{key: value})})
            refused(r, 400, words)
            assert r.json()["key"] == key
        deep = "[" * 100_000 + "]" * 100_000
        refused(c.post("/api/resolve", content=deep, headers={"Content-Type": "application/json"}), 400, "nested")
        refused(c.post("/api/start", content='{"name": "a", "form": {"method.r": 1' + "0" * 5000 + "}}",
                       headers={"Content-Type": "application/json"}), 400, "not valid JSON")
        refused(c.get("/api/runs/a%00b"), 400, "is not a run name")
    assert not (folders / "runs" / "a").exists()


def test_a_runs_files_holding_nan_or_odd_shapes_render(folders):
    nan = {"metrics.jsonl": '{"step": 1, "loss": NaN, "seconds": NaN}\n{"step": 2, "eval_loss": Infinity, '
                            '"eval_accuracy": NaN}\n{"step": 2, "eval_accuracy": 0.5}\n',
           "summary.json": '{"seconds": NaN, "steps": 2, "after": {"accuracy": NaN, "loss": -Infinity}}'}
    fake_run(folders, "nan", nan)
    odd = fake_run(folders, "odd", {"summary.json": "[" * 5000 + "]" * 5000,
                                    "metrics.jsonl": '{"step": 1, "x": ' + "[" * 5000 + "]" * 5000 + "}\n"})
    (odd / "config.yaml").write_bytes(b"train: [1, 2]\nmethod: 5\ndata: \xff\xfe\n")
    (folders / "runs" / ".ui" / "odd").mkdir(parents=True)
    (folders / "runs" / ".ui" / "odd" / "launch.json").write_text('{"launches": [1, "x", null]}')
    with client(folders) as c:
        rows = {r["name"]: r for r in c.get("/api/runs").json()["runs"]}
        assert rows["nan"]["best"] == ["accuracy", 0.5] and rows["nan"]["seconds"] is None
        assert rows["odd"]["method"] == 5 and rows["odd"]["max_steps"] is None
        detail = c.get("/api/runs/nan").json()
        assert detail["summary"]["seconds"] is None and detail["summary"]["after"] == {"accuracy": None, "loss": None}
        assert [r.get("loss", 0) for r in c.get("/api/runs/nan/metrics").json()["records"]] == [None, 0, 0]
        odd_detail = c.get("/api/runs/odd")
        assert odd_detail.status_code == 200 and "\ufffd" in odd_detail.json()["config"]
        assert c.get("/api/runs/odd/metrics").json()["dropped"] == 1
        fake_run(folders, "text", {"summary.json": json.dumps({"trainable_parameters": "many", "seconds": [1],
                                                               "after": {"accuracy": "high", "n": 0, "seconds": 1}})})
        compared = c.post("/api/compare", json={"runs": ["nan", "odd", "text"]})
        assert compared.status_code == 200, compared.text
        assert [row[0] for row in compared.json()["rows"]] == ["nan", "text"] and compared.json()["skipped"] == ["odd"]


def test_the_ui_command_names_a_bad_port_runs_folder_or_host_in_one_line(folders, capsys):
    (folders / "afile").write_text("not a folder")
    for args, words in [(["--port", "99999"], "--port: 99999 is not a port"),
                        (["--port", "-1"], "--port: -1 is not a port"),
                        (["--runs", "afile", "--port", "0"], "--runs afile: is a file, not a folder"),
                        (["--host", "not a host", "--port", "0"], "--host: cannot find the address 'not a host'"),
                        (["--host", "192.0.2.1", "--port", "0"], "--host: cannot listen on 192.0.2.1")]:
        assert cli.main(["ui", "--runs", "runs", *args]) == 2, args
        assert one_line(capsys.readouterr().err).startswith(f"tuneforge: error: {words}"), args
    assert not (folders / "runs").exists()
