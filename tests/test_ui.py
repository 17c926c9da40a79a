"""`tuneforge ui` over HTTP (Starlette's test client): the form read as the YAML parser reads it,
paths kept inside the folders given, the access token, every status a run folder can be in, and a
run launched, stopped and resumed as a child process (SIGINT, as Ctrl-C)."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from pathlib import Path

import pytest
import yaml

from test_run import sentiment_rows, write_jsonl
from tuneforge import cli
from tuneforge.core import config
from tuneforge.core.errors import UserError
from tuneforge.core.config.methods import METHODS

pytest.importorskip("starlette")
pytest.importorskip("httpx")  # the test client
from starlette.testclient import TestClient  # noqa: E402

from tuneforge.apps.ui import form  # noqa: E402
from tuneforge.apps.ui.server import App, build, create_app  # noqa: E402

LOCAL = "http://127.0.0.1"
TOKEN = "s3cret"


@pytest.fixture
def folders(tmp_path, tiny_dir, monkeypatch):
    """A working folder with runs/ and data/ (a sentiment file and the tiny model)."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_dir, tmp_path / "data" / "tiny")
    write_jsonl(tmp_path / "data" / "reviews.jsonl", sentiment_rows(12))
    return tmp_path


def client(root: Path) -> TestClient:
    """The page's API as its own script calls it: every request with the token in its header."""
    return served(App(root / "runs", [root / "data"], cwd=root))


def served(app: App) -> TestClient:
    return TestClient(build(app, TOKEN, True), base_url=LOCAL, headers={"X-Tuneforge-Token": TOKEN})


def lora_form(**values) -> dict:
    return {"method.name": "lora", "model": "data/tiny", "data.path": "data/reviews.jsonl",
            "data.format": "classification", **values}


def test_every_field_shows_its_type_default_and_the_comment_that_documents_it():
    schema = form.schema()
    assert set(schema["methods"]) == set(METHODS)
    lora = {f["key"]: f for f in schema["methods"]["lora"]}
    assert lora["method.r"] == {"key": "method.r", "type": "int", "kind": "text", "choices": None, "default": "8",
                                "help": "rank of the update"}
    assert lora["method.target_modules"]["default"] == ""  # null: the model family's, as PEFT picks them
    assert lora["method.target_modules"]["help"].startswith("names")  # the comment lines above the field
    train = {f["key"]: f for f in schema["sections"]["train"]}
    assert "train.output_dir" not in train  # the run's folder is RUNS/<run name>
    assert train["train.skip_nonfinite_steps"]["help"].startswith("A step whose loss") and \
        train["train.skip_nonfinite_steps"]["help"].endswith("before it stops")
    assert train["train.lr_schedule"]["choices"] == ["cosine", "linear", "constant"]
    assert train["train.eval_at_start"]["kind"] == "bool"
    prefix = {f["key"]: f for f in schema["methods"]["prefix"]}
    assert prefix["method.init_weights"]["choices"] == ["", "zero"]  # "" is null
    # the class's docstring
    assert prefix["method.token_dim"]["help"].startswith("The model's shape as PEFT records it")
    qlora = {f["key"]: f for f in schema["methods"]["qlora"]}
    assert qlora["method.r"]["help"] == "rank of the update"  # inherited from LoRA's config


def test_the_form_is_read_by_the_yaml_parser_with_each_fields_type():
    cfg = form.resolve({"method.name": "lora", "method.target_modules": "[q_proj, k_proj]", "method.r": "8",
                        "train.learning_rate": "1e-4", "data.instruction": "1", "data.max_examples": "",
                        "train.eval_at_start": "true"}, "runs/x")
    assert cfg.method.args["target_modules"] == ["q_proj", "k_proj"] and cfg.method.args["r"] == 8
    assert cfg.train.learning_rate == 1e-4 and cfg.data.instruction == "1" and cfg.data.max_examples is None
    assert cfg.train.eval_at_start is True and cfg.train.output_dir == "runs/x"
    # values left at their defaults are not written: the config's own defaults apply
    assert form.to_raw({"method.name": "lora", "method.r": "8", "train.seed": "0"}, "runs/x") == \
        {"method": {"name": "lora"}, "train": {"output_dir": "runs/x"}}
    # what a form field holds reads back to the field's default
    for f in [*form.schema()["sections"]["train"], *form.schema()["methods"]["lora"]]:
        raw = form.to_raw({"method.name": "lora", f["key"]: f["default"]}, "runs/x")
        assert raw == {"method": {"name": "lora"}, "train": {"output_dir": "runs/x"}}, f["key"]


def test_a_malformed_form_value_gets_the_parsers_one_line_error(folders):
    with client(folders) as c:
        r = c.post("/api/resolve", json={"name": "a", "form": lora_form(**{"train.learning_rate": "abc"})})
    assert r.status_code == 400
    assert r.json() == {"error": "the form: key 'train.learning_rate': expected float, got 'abc'; correct the value",
                        "key": "train.learning_rate"}
    with pytest.raises(UserError) as cli_error:  # the same words as --set gets
        config.from_dict({}, overrides=["train.learning_rate=abc"])
    assert r.json()["error"].endswith(f"{cli_error.value.what}; {cli_error.value.fix}")
    with client(folders) as c:
        r = c.post("/api/resolve", json={"name": "a", "form": lora_form(**{"method.r": "0"})})
        assert (r.status_code, r.json()["key"]) == (400, "method.r")  # a check in the method's own config
        assert c.post("/api/start", json={"name": "a", "form": lora_form(**{"method.r": "0"})}).status_code == 400
    assert not (folders / "runs" / "a").exists() and not (folders / "runs" / ".ui" / "a").exists()


def test_a_path_outside_the_allowed_folders_is_refused(folders, tmp_path_factory):
    outside = tmp_path_factory.mktemp("elsewhere")
    write_jsonl(outside / "secret.jsonl", sentiment_rows(2))
    (folders / "data" / "link.jsonl").symlink_to(outside / "secret.jsonl")
    with client(folders) as c:
        ok = c.post("/api/resolve", json={"name": "a", "form": lora_form()})
        assert ok.status_code == 200, ok.text
        assert "output_dir: runs/a" in ok.json()["yaml"]
        for key, value in [("data.path", str(outside / "secret.jsonl")), ("data.path", "../elsewhere/x.jsonl"),
                           ("data.path", "data/link.jsonl"), ("data.eval_path", "/etc/passwd"),
                           ("model", str(outside))]:
            r = c.post("/api/resolve", json={"name": "a", "form": lora_form(**{key: value})})
            assert r.status_code == 400 and r.json()["key"] == key, (key, value, r.text)
            assert "outside the folders this page may read" in r.json()["error"]
        for name in ("../x", ".ui", "a/b", ""):
            r = c.post("/api/start", json={"name": name, "form": lora_form()})
            assert r.status_code == 400 and "is not a run name" in r.json()["error"], name
        for path in ("/api/runs/..%2F..%2Fetc", "/api/try/..%2Fdata", "/static/..%2F..%2Fpyproject.toml",
                     "/api/compare/..%2F..%2F..%2F/compare.png", "/api/compare/0123456789ab/compare.png"):
            r = c.get(path)
            assert r.status_code in (400, 404), (path, r.status_code)
            assert "[build-system]" not in r.text
    assert not any((folders / "runs").iterdir())


@pytest.mark.parametrize("local", [True, False])
def test_every_request_needs_the_token_printed_at_start(folders, local):
    c = TestClient(create_app(folders / "runs", [folders / "data"], cwd=folders, token=TOKEN, local=local),
                   base_url=LOCAL)
    paths = ["/", "/runs", "/runs/x", "/compare", "/try", "/static/app.js", "/api/options", "/api/runs",
             "/api/runs/x", "/api/runs/x/metrics", "/api/try/x", "/api/compare/0123456789ab/compare.png"]
    posts = ["/api/resolve", "/api/estimate", "/api/start", "/api/runs/x/stop", "/api/runs/x/resume", "/api/compare",
             "/api/try/x/classify", "/api/try/x/generate"]
    for path in paths:
        assert c.get(path).status_code == 401, path
        assert c.get(path, headers={"X-Tuneforge-Token": "wrong"}).status_code == 401, path
    for path in posts:
        assert c.post(path, json={"name": "a", "form": lora_form()}).status_code == 401, path
    assert c.get("/api/runs", headers={"X-Tuneforge-Token": TOKEN}).status_code == 200
    # the printed address: the token moves into a cookie, which then opens the pages
    r = c.get(f"/runs?token={TOKEN}", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/runs" and "httponly" in r.headers["set-cookie"].lower()
    assert c.get("/api/runs").status_code == 200 and c.get("/static/app.js").status_code == 200
    assert f'<meta name="tuneforge-token" content="{TOKEN}">' in c.get("/runs").text  # for the page's script
    # a request that acts needs the header, which only the page's script sends: the cookie is not enough
    assert c.post("/api/runs/x/stop", json={}).status_code == 401
    assert c.post("/api/runs/x/stop", json={}, headers={"X-Tuneforge-Token": TOKEN}).status_code == 404


def test_a_local_server_answers_only_local_names_and_json_posts(folders):
    with client(folders) as c:
        assert c.get("/api/runs", headers={"Host": "attacker.example"}).status_code == 403  # DNS rebinding
        assert c.get("/api/runs", headers={"Host": "localhost:7860"}).status_code == 200
        r = c.post("/api/start", content='{"name": "a"}', headers={"Content-Type": "text/plain"})
        assert r.status_code == 415  # what a form on another site could send
        assert c.post("/api/start", content="not json", headers={"Content-Type": "application/json"}).status_code == 400


def fake_run(root: Path, name: str, files: dict[str, str] | None = None) -> Path:
    """A run folder as a run leaves it: its config and ``files`` (relative path -> text)."""
    folder = root / "runs" / name
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump({"method": {"name": "lora"}, "data": {"path": "d.jsonl"},
                                                        "train": {"max_steps": 10}}))
    for rel, text in (files or {}).items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return folder


def test_each_status_a_run_folder_can_be_in_and_what_the_page_says(folders):
    lines = [{"step": 2, "loss": 3.0, "seconds": 1.5}, {"step": 2, "eval_loss": 2.5, "eval_accuracy": 0.5}]
    metrics = "".join(json.dumps(r) + "\n" for r in lines) + '{"step": 3, "loss": 2.'  # a torn last line
    summary = json.dumps({"method": "lora", "steps": 4, "seconds": 9.0, "after": {"accuracy": 0.75}})
    fake_run(folders, "done", {"metrics.jsonl": metrics, "summary.json": summary})
    fake_run(folders, "stopped", {"metrics.jsonl": metrics, "checkpoints/step-0000002/state.json": "{}"})
    fake_run(folders, "broken", {"metrics.jsonl": "not json at all\n"})
    live = fake_run(folders, "live", {".tuneforge.lock": f"{os.getpid()}\n"})
    (folders / "runs" / "compare").mkdir()
    (folders / "runs" / "compare" / "compare.md").write_text("| label |\n")  # a compare folder is not a run
    fd = os.open(live / ".tuneforge.lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held, as a training run holds it
    try:
        with client(folders) as c:
            rows = {r["name"]: r for r in c.get("/api/runs").json()["runs"]}
            assert {n: r["status"] for n, r in rows.items()} == \
                {"done": "finished", "stopped": "interrupted", "broken": "failed", "live": "running"}
            assert rows["done"]["best"] == ["accuracy", 0.75] and rows["done"]["steps"] == 4
            assert rows["stopped"]["steps"] == 2 and rows["stopped"]["seconds"] == 1.5
            assert "step-0000002" in rows["stopped"]["detail"]
            m = c.get("/api/runs/stopped/metrics").json()
            assert m["dropped"] == 1 and [r["step"] for r in m["records"]] == [2, 2]
            assert c.get("/api/runs/broken").json()["dropped"] == 1
            refusal = c.post("/api/runs/done/resume", json={}).json()["error"]
            assert refusal.startswith("runs/done: this run is finished")
            assert c.post("/api/runs/broken/resume", json={}).json()["error"].startswith("runs/broken: this run has no")
            os.rename(folders / "runs" / "done", folders / "runs" / "gone")  # deleted while the page watches
            r = c.get("/api/runs/done")
            assert r.status_code == 404 and "there is no run named 'done'" in r.json()["error"]
            assert c.get("/api/runs/done/metrics").status_code == 404
            assert "gone" in {r["name"] for r in c.get("/api/runs").json()["runs"]}
    finally:
        os.close(fd)


def test_resume_refuses_a_finished_run(folders):
    """A finished run (summary.json written) keeps its checkpoints; resuming it would evaluate it again and
    write its final/ and summary.json over."""
    summary = json.dumps({"method": "lora", "steps": 10, "after": {"accuracy": 0.75}})
    folder = fake_run(folders, "done", {"summary.json": summary, "final/adapter_config.json": "{}",
                                        "checkpoints/step-0000010/state.json": "{}"})
    with client(folders) as c:
        r = c.post("/api/runs/done/resume", json={})
        assert r.status_code == 400, r.text
        assert r.json() == {"error": "runs/done: this run is finished (its summary.json is written): there is nothing "
                                     "to resume; start a new run with its settings to train again", "key": None}
    assert not (folders / "runs" / ".ui" / "done").exists()  # nothing was launched
    assert (folder / "summary.json").read_text() == summary


def test_the_best_figure_is_over_evaluations_after_training_began(folders):
    """train.eval_at_start logs the untrained model's figures at step 0: they are not the run's best."""
    def lines(*records):
        return "".join(json.dumps(r) + "\n" for r in records)

    start = {"step": 0, "eval_loss": 0.4, "eval_accuracy": 0.82}
    fake_run(folders, "trained", {"metrics.jsonl": lines(start, {"step": 5, "loss": 1.0},
                                                         {"step": 5, "eval_loss": 0.9, "eval_accuracy": 0.6})})
    fake_run(folders, "losses", {"metrics.jsonl": lines(start, {"step": 5, "eval_loss": 0.9})})
    fake_run(folders, "done", {"metrics.jsonl": lines(start, {"step": 5, "eval_accuracy": 0.6}),
                               "summary.json": json.dumps({"steps": 10, "after": {"accuracy": 0.7}})})
    fake_run(folders, "untrained", {"metrics.jsonl": lines(start)})
    with client(folders) as c:
        rows = {r["name"]: r["best"] for r in c.get("/api/runs").json()["runs"]}
    assert rows == {"trained": ["accuracy", 0.6], "losses": ["eval loss", 0.9], "done": ["accuracy", 0.7],
                    "untrained": ["accuracy before training", 0.82]}


def test_the_data_list_offers_only_data_files(folders):
    data = folders / "data"
    for name in ("LICENSE-MIT.txt", "LICENSE-APACHE.txt", "LICENCE.txt", "README.md", "README.txt", "NOTICE",
                 "notes.md", "config.yaml", "corpus.txt", "pairs.csv", "train.parquet", "chats.arrow", ".hidden.jsonl"):
        (data / name).write_text("x\n")
    saved = data / "saved"  # written by datasets' save_to_disk: read as a whole
    saved.mkdir()
    for name in ("state.json", "dataset_info.json", "data-00000-of-00001.arrow"):
        (saved / name).write_text("{}")
    with client(folders) as c:
        files = c.get("/api/options").json()["data_files"]
    assert files == ["data/chats.arrow", "data/corpus.txt", "data/pairs.csv", "data/reviews.jsonl",
                     "data/train.parquet", "data/saved"]


BAD_DATA = {  # (form values, the file it writes under data/ or None): what `tuneforge estimate` refuses
    "a file that is not there": ({"data.path": "data/nothere.jsonl"}, None),
    "a folder": ({"data.path": "data/tiny"}, None),
    "a TSV without data.columns": ({"data.path": "data/reviews.tsv"}, "positive\tgood film\nnegative\tdull film\n" * 6),
    "raw text that is not there": ({"data.path": "data/nothere.txt", "data.format": "text"}, None),
    "no example short enough": ({"data.max_length": "2"}, None),
    "an evaluation file that is not there": ({"data.eval_path": "data/held-out.jsonl"}, None),
}


@pytest.mark.parametrize("case", BAD_DATA)
def test_the_estimate_and_start_read_the_data_as_the_cli_estimate_does(folders, capsys, case):
    values, text = BAD_DATA[case]
    if text is not None:
        (folders / values["data.path"]).write_text(text)
    cfg = config.from_dict(form.to_raw(lora_form(**values), "runs/a"))
    (folders / "a.yaml").write_text(config.to_yaml(cfg))
    capsys.readouterr()
    assert cli.main(["estimate", "a.yaml"]) == 2
    said = capsys.readouterr().err.strip().removeprefix("tuneforge: error: ")
    key = "data.eval_path" if "data.eval_path" in values else "data.path"
    with client(folders) as c:
        for route in ("/api/estimate", "/api/start"):
            r = c.post(route, json={"name": "a", "form": lora_form(**values)})
            assert r.status_code == 400, (route, r.text)
            assert r.json() == {"error": said, "key": key}, route  # the command line's line, on its field
    assert not (folders / "runs" / "a").exists() and not (folders / "runs" / ".ui" / "a").exists()


def test_the_estimate_counts_the_training_examples_the_run_will_have(folders):
    (folders / "data" / "reviews.tsv").write_text("".join(f"{r['label']}\t{r['text']}\n" for r in sentiment_rows(12)))
    with client(folders) as c:
        for values, n in [({}, 22), ({"data.max_examples": "5"}, 5),
                          ({"data.path": "data/reviews.tsv", "data.columns": "[label, text]"}, 22)]:
            r = c.post("/api/estimate", json={"name": "a", "form": lora_form(**values)})
            assert r.status_code == 200 and r.json()["n_examples"] == n, (values, r.text)


def test_compare_tabulates_finished_runs_from_their_summaries(folders):
    for name, acc, params in (("a", 0.75, 1000), ("b", 0.5, 20)):
        fake_run(folders, name, {"summary.json": json.dumps({
            "method": "lora", "trainable_parameters": params, "peak_memory_mb": 300.0, "seconds": 12.5,
            "artifact_bytes": 2**20, "after": {"accuracy": acc, "macro_f1": acc - 0.1, "seconds": 0.5, "n": 10}})})
    fake_run(folders, "unfinished")
    with client(folders) as c:
        r = c.post("/api/compare", json={"runs": ["a", "b", "unfinished"]})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["skipped"] == ["unfinished"] and body["columns"][:3] == ["label", "method", "accuracy"]
        assert body["rows"][0][:4] == ["a", "lora", "0.7500", "0.6500"]
        by_column = dict(zip(body["columns"], body["rows"][1]))
        assert by_column["trainable_params"] == "20" and by_column["artifact_mb"] == "1.00"
        assert by_column["infer_ms_per_example"] == "50.0" and by_column["train_seconds"] == "12.5"
        png = c.get(body["chart"])
        assert png.status_code == 200 and png.content.startswith(b"\x89PNG")
        assert c.post("/api/compare", json={"runs": ["unfinished"]}).status_code == 400
        assert c.post("/api/compare", json={"runs": ["nope"]}).status_code == 404


def wait_until(check, what: str, seconds: float = 90):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_run_is_started_stopped_with_sigint_and_resumed_as_a_child_process(folders):
    app = App(folders / "runs", [folders / "data"], cwd=folders)
    c = served(app)
    body = {"name": "r1", "form": lora_form(**{"method.r": "2", "train.max_steps": "100000",
                                                                  "train.batch_size": "2", "train.logging_steps": "1"})}
    r = c.post("/api/start", json=body)
    assert r.status_code == 200, r.text
    launched = yaml.safe_load((folders / "runs" / ".ui" / "r1" / "config.yaml").read_text())
    assert launched["train"]["output_dir"] == "runs/r1" and launched["method"]["r"] == 2
    assert c.post("/api/start", json=body).json()["error"].startswith("runs/r1: there is already a run named")

    def steps():
        return [r["step"] for r in c.get("/api/runs/r1/metrics").json()["records"] if "loss" in r]

    wait_until(steps, "the first logged step")
    assert c.get("/api/runs/r1").json()["status"] == "running"
    assert c.post("/api/runs/r1/stop", json={}).status_code == 200
    assert app.runs.wait("r1", timeout=60) == 130  # saved a checkpoint and exited as after Ctrl-C
    run = c.get("/api/runs/r1").json()
    assert run["status"] == "interrupted" and "exited with code 130" in run["detail"], run
    saved = int(next((folders / "runs" / "r1" / "checkpoints").glob("step-*")).name.removeprefix("step-"))
    assert c.post("/api/runs/r1/stop", json={}).status_code == 400  # not running any more

    assert c.post("/api/runs/r1/resume", json={}).status_code == 200
    wait_until(lambda: steps() and steps()[-1] > saved, "a step after the checkpoint")
    assert c.post("/api/runs/r1/resume", json={}).status_code == 400  # it is running
    assert c.post("/api/runs/r1/stop", json={}).status_code == 200
    assert app.runs.wait("r1", timeout=60) == 130
    run = c.get("/api/runs/r1").json()
    assert run["status"] == "interrupted" and run["launched_here"]
    assert "tuneforge train runs/r1/config.yaml --resume" in run["log"] and "resuming from step-" in run["log"]
    launches = json.loads((folders / "runs" / ".ui" / "r1" / "launch.json").read_text())["launches"]
    assert [launch["exit"] for launch in launches] == [130, 130]


def test_stop_after_a_restart_signals_the_run_an_earlier_page_launched_once_it_is_verified(folders):
    """A run launched by an earlier `tuneforge ui` runs in a session of its own, with no terminal: the page
    started again stops it, once /proc shows the very process launch.json recorded (its pid and start
    time, the command the page launches, the page's working folder); else it says the pid and the command."""
    earlier = App(folders / "runs", [folders / "data"], cwd=folders)
    body = {"name": "r1", "form": lora_form(**{"method.r": "2", "train.max_steps": "100000", "train.batch_size": "2",
                                               "train.logging_steps": "1"})}
    assert served(earlier).post("/api/start", json=body).status_code == 200
    c = served(App(folders / "runs", [folders / "data"], cwd=folders))  # the page started again
    wait_until(lambda: any("loss" in r for r in c.get("/api/runs/r1/metrics").json()["records"]), "a logged step")
    record = folders / "runs" / ".ui" / "r1" / "launch.json"
    launches = json.loads(record.read_text())["launches"]
    pid = launches[-1]["pid"]
    # the same pid, started at another time: a pid used again, which is never signalled
    record.write_text(json.dumps({"launches": [{**launches[-1], "ticks": launches[-1]["ticks"] + 1}]}))
    run = c.get("/api/runs/r1").json()
    assert run["status"] == "running" and run["stoppable"] is False and f"kill -INT {pid}" in run["stop_note"]
    r = c.post("/api/runs/r1/stop", json={})
    assert r.status_code == 400 and f"its lock names process {pid}: if that is the run, kill -INT {pid} stops it" \
        in r.json()["error"], r.text
    assert earlier.runs.child("r1") is not None  # still training
    record.write_text(json.dumps({"launches": launches}))
    assert c.get("/api/runs/r1").json()["stoppable"] is True
    r = c.post("/api/runs/r1/stop", json={})
    assert r.status_code == 200 and r.json() == {"stopped": pid}, r.text
    assert earlier.runs.wait("r1", timeout=60) == 130  # saved a checkpoint and exited as after Ctrl-C
    assert any((folders / "runs" / "r1" / "checkpoints").glob("step-*"))
    assert c.get("/api/runs/r1").json()["status"] == "interrupted"


def test_a_run_that_fails_keeps_its_log_and_the_page_says_why(folders):
    app = App(folders / "runs", [folders / "data"], cwd=folders)
    c = served(app)
    # valid for the parser and its data, but the child finds no adapter to start from
    r = c.post("/api/start", json={"name": "bad", "form": lora_form(**{"train.start_from": "data/tiny"})})
    assert r.status_code == 200, r.text
    assert app.runs.wait("bad", timeout=60) == 2
    run = c.get("/api/runs/bad").json()
    assert run["status"] == "failed" and "exited with code 2" in run["detail"]
    assert "tuneforge: error: data/tiny: no adapter_config.json here" in run["log"]
    assert c.get("/api/runs").status_code == 200  # the server goes on


def test_try_a_feature_classifier_labels_a_text_and_refuses_to_generate(folders):
    cfg = {"model": "data/tiny", "method": {"name": "features", "layer": 1},
           "data": {"path": "data/reviews.jsonl", "format": "classification", "max_length": 256},
           "train": {"output_dir": "runs/probe"}}
    (folders / "probe.yaml").write_text(yaml.safe_dump(cfg))
    assert cli.main(["train", "probe.yaml"]) == 0
    with client(folders) as c:
        info = c.post("/api/try/probe", json={}).json()
        assert info["generates"] is False and info["labels"] == ["negative", "positive"]
        labels = c.post("/api/try/probe/classify", json={"text": "a lovely film"}).json()["labels"]
        assert [x["label"] for x in labels] == ["negative", "positive"]
        assert sum(x["p"] for x in labels) == pytest.approx(1.0)
        r = c.post("/api/try/probe/generate", json={"text": "hi"})
        assert r.status_code == 400 and "feature classifier" in r.json()["error"]
        assert c.post("/api/try/nope", json={}).status_code == 404


def test_the_ui_command_names_a_bad_folder_or_a_busy_port_in_one_line(folders, capsys):
    assert cli.main(["ui", "--data", "no-such-folder", "--port", "0"]) == 2
    assert "--data no-such-folder: no such folder" in capsys.readouterr().err
    assert not (folders / "runs").exists()  # the arguments are checked before the runs folder is made
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        assert cli.main(["ui", "--data", "data", "--port", str(busy.getsockname()[1])]) == 2
    assert "--port: cannot listen on 127.0.0.1:" in capsys.readouterr().err
