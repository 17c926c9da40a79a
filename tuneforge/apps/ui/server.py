"""The web server of `tuneforge ui`: a small Starlette app serving one HTML page, its script and a
JSON API, run by uvicorn.

Safe by default, as Jupyter is: it binds 127.0.0.1 and there answers only requests addressed to a
local name (a page elsewhere cannot reach it through DNS rebinding), and every request needs the
access token printed at start, on 127.0.0.1 too, since every local account and process can reach that
address. The printed address carries the token once; then a cookie opens the pages, and the page's
script sends it as a header. A request that acts or costs (a POST: start, stop, resume, estimate, a
model loaded to try) must carry that header, be JSON and come from the page's own origin, none of
which a page on another site can arrange; its body is capped (413). Every file a request names,
and every file a run's config names when the page resumes or loads it, resolves inside the runs
folder or a data folder given on the command line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import re
import secrets
import socket
import sys
import threading
import traceback
from pathlib import Path
from urllib.parse import urlsplit

import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import (FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse,
                                 StreamingResponse)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from tuneforge.core import config
from tuneforge.core.config import RunCfg
from tuneforge.core.errors import UserError
from tuneforge.data.readers import ARROW_SUFFIXES, JSON_SUFFIXES, PARQUET_SUFFIXES, TABLE_SUFFIXES, file_kind
from tuneforge.apps.ui import form
from tuneforge.apps.ui.runs import SIDE, Runs, finite, inside

STATIC = Path(__file__).with_name("static")
LOCAL_NAMES = {"127.0.0.1", "localhost", "::1"}
COOKIE, HEADER = "tuneforge_token", "x-tuneforge-token"
MAX_BODY = 1 << 20  # bytes of a request's body: a form is a few KiB; more is refused (413), not read
MAX_DEPTH = 32  # levels of nesting a JSON answer keeps: more than anything the page shows
# The files the data list offers: those the data readers read by their name, and plain text, less the files
# beside data that are not data (a licence, a readme); a `datasets` folder (save_to_disk) is offered as one entry.
DATA_SUFFIXES = {*JSON_SUFFIXES, *TABLE_SUFFIXES, *PARQUET_SUFFIXES, *ARROW_SUFFIXES, ".txt"}
DATASETS_MARKS = {"dataset_dict.json", "state.json", "dataset_info.json"}
NOT_DATA = ("license", "licence", "copying", "notice", "readme", "changelog", "changes", "authors", "contributing",
            "citation")
SCAN_DEPTH, SCAN_LIMIT = 4, 500  # how deep and how many entries the lists of models and data files look


class NotFound(UserError):
    """A run or file that is not there: said on the page with status 404."""


class FieldError(UserError):
    """A UserError said in the words the command line uses, with the form's field it is about (``key``)
    marked on the page."""

    def __init__(self, error: UserError, key: str | None):
        super().__init__(error.what, error.where, error.fix)
        self.key = key


class TooLarge(UserError):
    """A request body over ``MAX_BODY``: said with status 413."""


STATUS = {NotFound: 404, TooLarge: 413}


class Gate:
    """ASGI middleware in front of every route, static files included (see the module's docstring)."""

    def __init__(self, app, token: str, local: bool):
        self.app, self.token, self.local = app, token, local

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request = Request(scope)
        response = self.refusal(request)
        if response is None and request.method == "GET" and request.query_params.get("token"):
            # The printed address: the token moves into a cookie and out of the address bar.
            rest = request.url.remove_query_params("token")
            response = RedirectResponse(rest.path + (f"?{rest.query}" if rest.query else ""), status_code=303)
            response.set_cookie(self.cookie(scope), self.token, httponly=True, samesite="strict")
        if response is not None:
            return await response(scope, receive, send)
        await self.app(scope, _capped(receive), send)

    @staticmethod
    def cookie(scope) -> str:
        """The cookie's name, by port: a browser sends localhost's cookies to every port, and two pages
        on one machine must not overwrite each other's token."""
        return f"{COOKIE}_{(scope.get('server') or ('', 0))[1]}"

    def refusal(self, request: Request):
        if self.local and urlsplit("//" + request.headers.get("host", "")).hostname not in LOCAL_NAMES:
            return PlainTextResponse("this page answers only at 127.0.0.1 or localhost\n", status_code=403)
        header = request.headers.get(HEADER, "")
        if request.method == "GET":
            cookie = request.cookies.get(self.cookie(request.scope), "")
            given = request.query_params.get("token") or header or cookie
            if not self.valid(given):
                return PlainTextResponse("this page needs its access token: open the address `tuneforge ui` "
                                         "printed when it started (it ends in ?token=...)\n", status_code=401)
            return None
        # A request that acts: the header only the page's own script can send, from the page's own origin.
        origin = request.headers.get("origin")
        if origin is not None and urlsplit(origin).netloc.lower() != request.headers.get("host", "").lower():
            return PlainTextResponse(f"a request from another site ({origin}) is refused\n", status_code=403)
        if not self.valid(header):
            return PlainTextResponse("send the page's access token in the X-Tuneforge-Token header (the page's "
                                     "own script does)\n", status_code=401)
        if request.headers.get("content-type", "").split(";")[0] != "application/json":
            return PlainTextResponse("send JSON (Content-Type: application/json)\n", status_code=415)
        if not request.headers.get("content-length", "0").isdigit():
            return PlainTextResponse("a Content-Length that is not a number\n", status_code=400)
        if int(request.headers.get("content-length", "0")) > MAX_BODY:
            return PlainTextResponse(f"the request is over {MAX_BODY} bytes\n", status_code=413)
        return None

    def valid(self, given: str) -> bool:
        return secrets.compare_digest(given.encode(), self.token.encode())


def _capped(receive):
    """``receive`` that stops a body (one sent in chunks, without a length) once it passes ``MAX_BODY``."""
    seen = 0

    async def capped():
        nonlocal seen
        message = await receive()
        seen += len(message.get("body", b""))
        if seen > MAX_BODY:
            raise TooLarge(f"the request is over {MAX_BODY} bytes", "request", fix="send a smaller form")
        return message

    return capped


def _plain(value, depth: int = 0):
    """``value`` as strict JSON can carry it: a non-finite number (a NaN loss a run logged) is null, and
    anything nested deeper than ``MAX_DEPTH`` (no run writes that) is left out."""
    if isinstance(value, float):
        return value if finite(value) else None
    if depth >= MAX_DEPTH and isinstance(value, (dict, list, tuple)):
        return None
    if isinstance(value, dict):
        return {k: _plain(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, depth + 1) for v in value]
    return value


def number(value) -> int | float | None:
    return value if finite(value) else None


class Json(JSONResponse):
    """Every JSON answer of the API, through ``_plain``."""

    def render(self, content) -> bytes:
        return super().render(_plain(content))


class Estimator:
    """``tuneforge.training.estimate`` for the New run page: the device's matmul rate is measured once (the
    server starts that in the background, so the page's first estimate need not wait for torch to
    load), and estimates are kept by config, since the form asks again for every change."""

    def __init__(self):
        self._rates: dict[str, float] = {}
        self._cache: dict[str, dict] = {}
        self._lock = threading.Lock()

    def warm(self) -> None:
        threading.Thread(target=self._rate, args=("auto",), daemon=True).start()

    def _rate(self, device: str) -> float:
        with self._lock:
            if device not in self._rates:
                from tuneforge.model.devices import resolve_device
                from tuneforge.training.estimate import matmul_flops_per_s

                self._rates[device] = matmul_flops_per_s(resolve_device(device))
            return self._rates[device]

    def __call__(self, cfg: RunCfg, n_examples: int | None) -> dict:
        from tuneforge.training.estimate import estimate

        key = config.to_yaml(cfg) + f"\n#{n_examples}"
        if key not in self._cache:
            if len(self._cache) >= 256:
                self._cache.clear()
            est = estimate(cfg, n_examples=n_examples, flops_per_s=self._rate(cfg.train.device))
            gib = 2**30
            self._cache[key] = {
                "total_params": est.total_params, "trainable_params": est.trainable_params,
                "peak_gib": est.peak_bytes / gib,
                "parts_gib": {k.replace("_", " "): v / gib for k, v in est.parts.items()},
                "seconds_per_step": est.step_seconds, "tokens_per_step": est.tokens_per_step, "steps": est.steps,
                "run_seconds": est.run_seconds, "n_examples": n_examples, "describe": est.describe()}
        return self._cache[key]


class App:
    """What the routes share: the folders, the runs, the estimator and the Try page's model."""

    def __init__(self, runs_dir: str | Path, data_dirs: list[str | Path], cwd: str | Path | None = None):
        # Every argument is checked before the runs folder is made: a mistake leaves nothing behind.
        cwd = Path(cwd or os.getcwd()).resolve()
        if Path(cwd, runs_dir).is_file():
            raise UserError("is a file, not a folder", f"--runs {runs_dir}",
                            fix="name a folder for the runs (it is made if it is missing)")
        self.data_dirs = []
        for d in data_dirs:
            path = Path(cwd, d).resolve()
            if not path.is_dir():
                raise UserError("no such folder", f"--data {d}", fix="name a folder that holds data files or models")
            self.data_dirs.append(path)
        try:
            self.runs = Runs(runs_dir, cwd)
        except OSError as exc:
            raise UserError(f"cannot make the folder: {exc.strerror}", f"--runs {runs_dir}",
                            fix="name a folder you can write") from None
        self.roots = [self.runs.root, *self.data_dirs]
        self.estimator = Estimator()
        self._playground = None
        self._examples: dict[tuple, int] = {}  # training examples, by what was read (see ``examples``)
        self._reading = threading.Lock()

    @property
    def playground(self):
        if self._playground is None:
            from tuneforge.apps.ui.tryout import Playground

            self._playground = Playground(self.runs, self.check)
        return self._playground

    def check(self, cfg: RunCfg, source: str) -> None:
        """Every file ``cfg`` names (a named model aside) lies inside the runs folder or a data folder;
        else a UserError naming the key, as ``source`` (the form, or a run's config.yaml) wrote it."""
        from tuneforge.io.load import NAMED_MODELS

        for key, value in form.path_values(cfg).items():
            if key == "model" and value in NAMED_MODELS:
                continue
            if "\0" in value:
                raise UserError("a path cannot hold a NUL byte", f"{source}: key '{key}'", fix="correct the path")
            if inside(Path(self.runs.cwd, value), self.roots) is None:
                raise UserError(f"{value!r} is outside the folders this page may read", f"{source}: key '{key}'",
                                fix="choose a file under " + ", ".join(self.runs.display(r) for r in self.roots)
                                    + ", or start tuneforge ui with --data FOLDER")

    # --- the New run page --------------------------------------------------------------------
    def scan(self) -> tuple[list[str], list[str]]:
        """(model folders and .gguf files, data files) under the data folders and in runs' results."""
        models, files, seen = [], [], 0
        for root in self.data_dirs:
            for folder, dirs, names in os.walk(root):
                depth = len(Path(folder).relative_to(root).parts)
                dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if depth < SCAN_DEPTH else []
                seen += len(dirs) + len(names)
                if seen > SCAN_LIMIT:
                    break
                if "config.json" in names:  # a Hugging Face model folder
                    models.append(self.runs.display(folder))
                    dirs[:] = []
                    continue
                if DATASETS_MARKS & set(names) and datasets_folder(Path(folder)):  # read as a whole
                    files.append(self.runs.display(folder))
                    dirs[:] = []
                    continue
                for n in sorted(names):
                    suffix = Path(n).suffix.lower()
                    if suffix == ".gguf":
                        models.append(self.runs.display(Path(folder, n)))
                    elif suffix in DATA_SUFFIXES and not n.startswith(".") and not n.lower().startswith(NOT_DATA):
                        files.append(self.runs.display(Path(folder, n)))
        for name in self.runs.names():  # a full fine-tuning run's result is a model folder
            if (self.runs.folder(name) / "final" / "config.json").is_file():
                models.append(self.runs.display(self.runs.folder(name) / "final"))
        return models, files

    def options(self) -> dict:
        from tuneforge.io.load import NAMED_MODELS

        models, files = self.scan()
        return {"models": [*NAMED_MODELS, *models], "data_files": files, "schema": form.schema(),
                "runs_dir": self.runs.display(self.runs.root),
                "data_dirs": [self.runs.display(d) for d in self.data_dirs]}

    def resolve(self, body: dict) -> tuple[str, RunCfg]:
        """(run name, config) from the form, every path in it checked; UserError otherwise."""
        name = str(body.get("name") or "")
        folder = self.runs.folder(name)
        values = body.get("form")
        if not isinstance(values, dict):
            raise UserError("the request holds no form", "the form", fix="send {\"form\": {key: value}}")
        cfg = form.resolve(values, self.runs.display(folder))
        self.check(cfg, form.SOURCE)
        return name, cfg

    def resume(self, name: str) -> None:
        """Resume a run, once the files its config.yaml names are checked as a new run's are."""
        self.runs.resume(name, lambda path: self.check(config.from_yaml(path), self.runs.display(path)))

    def examples(self, cfg: RunCfg, starting: bool = False) -> int | None:
        """The data read as `tuneforge estimate` reads it before a run (``load_datasets`` on the model's
        tokenizer), so that what would stop the run at once (a missing file, a folder, a table without the
        columns its format reads, no example short enough) is the command line's one line, marking its
        field, before anything starts. Returns how many training examples the run will have (after the
        split, the length limit and the cap), so the estimate can give the time per run; None for raw
        text, which is cut into blocks, and, unless ``starting``, while no data file is chosen."""
        if not cfg.data.path and not starting:
            return None
        from tuneforge.data import load_datasets
        from tuneforge.io.load import NAMED_MODELS, load_tokenizer

        here = {}  # each file's path as it is read here (from the working folder) -> (its key, as the form wrote it)

        def place(key: str, written: str) -> str:
            path = str(Path(self.runs.cwd, written))
            here.setdefault(path, (key, written))
            return path

        data = cfg.data
        if isinstance(data.path, list):
            data = dataclasses.replace(data, path=[dataclasses.replace(s, path=place("data.path", s.path))
                                                   for s in data.path])
        elif data.path:
            data = dataclasses.replace(data, path=place("data.path", data.path))
        if data.eval_path:
            data = dataclasses.replace(data, eval_path=place("data.eval_path", data.eval_path))
        model = cfg.model if cfg.model in NAMED_MODELS else place("model", cfg.model)
        key = (repr(data), model, cfg.train.seed, *(_stamp(path) for path in here))
        with self._reading:  # one read at a time: the form asks again for every change, and a read can be long
            n = self._examples.get(key)
            if n is None:
                try:
                    n = len(load_datasets(data, load_tokenizer(model), seed=cfg.train.seed).train)
                except UserError as exc:
                    raise _field_error(exc, here) from None
                if len(self._examples) >= 256:
                    self._examples.clear()
                self._examples[key] = n
        return None if cfg.data.format == "text" else n

    # --- the Compare page --------------------------------------------------------------------
    def compare(self, names: list[str]) -> dict:
        """The table and chart `tuneforge compare` writes, from the chosen runs' summary.json files."""
        from tuneforge.apps.compare import COLUMNS, plot, write_tables

        rows, skipped = [], []
        for name in names:
            summary = self.runs.summary(name)
            if summary is None:
                skipped.append(name)
                continue
            # Only finite numbers reach the table: a NaN, or a string where a number belongs, is a blank cell.
            after = summary.get("after") if isinstance(summary.get("after"), dict) else {}
            seconds, n = number(after.get("seconds")), number(after.get("n"))
            size = number(summary.get("artifact_bytes"))
            rows.append({"label": name, "method": str(summary.get("method") or ""),
                         "accuracy": number(after.get("accuracy")), "macro_f1": number(after.get("macro_f1")),
                         "trainable_params": number(summary.get("trainable_parameters")),
                         "peak_memory_mb": number(summary.get("peak_memory_mb")),
                         "train_seconds": number(summary.get("seconds")),
                         "infer_ms_per_example": 1000 * seconds / n if seconds is not None and n else None,
                         "artifact_mb": size / 2**20 if size is not None else None})
        if not rows:
            raise UserError("none of the chosen runs has finished", "Compare", fix="choose runs with a summary.json")
        key = hashlib.sha1(json.dumps(names).encode()).hexdigest()[:12]
        out = self.compare_dir(key)
        write_tables(rows, out)
        plot(rows, out / "compare.png")
        lines = (out / "compare.md").read_text(encoding="utf-8").splitlines()
        cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines[2:]]
        return {"columns": COLUMNS, "rows": cells, "key": key, "skipped": skipped,
                "chart": f"/api/compare/{key}/compare.png?v={(out / 'compare.png').stat().st_mtime_ns}"}

    def compare_dir(self, key: str) -> Path:
        return self.runs.inside(self.runs.root / SIDE / ".compare" / key)


def datasets_folder(folder: Path) -> bool:
    """Whether ``folder`` is one the data readers read as a whole: a `datasets` folder (save_to_disk)."""
    try:
        return file_kind(folder) == "datasets"
    except UserError:
        return False


def _stamp(path: str) -> tuple:
    """What changes when the file at ``path`` is written (a folder: when an entry is added or removed), to
    know when to read it again."""
    try:
        st = os.stat(path)
    except OSError:
        return (path,)
    return path, st.st_mtime_ns, st.st_size


def _field_error(exc: UserError, here: dict[str, tuple[str, str]]) -> FieldError:
    """``exc``, raised while the data was read, said of the form's field at fault: an error about a file
    (``where`` starts with its path as it was read, a key of ``here``) names the path as the form wrote it
    and marks that file's key; an error about a key (``data.max_length``) marks that key."""
    where = exc.where or ""
    for path in sorted(here, key=len, reverse=True):
        if where == path or where.startswith((path + ":", path + "/")):
            key, written = here[path]
            return FieldError(UserError(exc.what, written + where[len(path):], exc.fix), key)
    return FieldError(exc, where if re.fullmatch(r"[a-z_]+(\.[a-z_]+)+", where) else None)


async def _body(request: Request) -> dict:
    try:
        body = await request.json()
    except ValueError:
        raise UserError("the request is not valid JSON", "request") from None
    except RecursionError:
        raise UserError("the request is nested deeper than a form is", "request") from None
    if not isinstance(body, dict):
        raise UserError("the request must be a JSON object", "request")
    return body


def _error(exc: UserError) -> Json:
    key = exc.key if isinstance(exc, FieldError) else form.error_key(exc.where)
    return Json({"error": exc.line(), "key": key}, status_code=STATUS.get(type(exc), 400))


def create_app(runs_dir: str | Path, data_dirs: list[str | Path], *, token: str, local: bool = True,
               cwd: str | Path | None = None) -> Gate:
    """The whole app as an ASGI callable; ``token`` is required by every request."""
    return build(App(runs_dir, data_dirs, cwd), token, local)


def build(app: App, token: str, local: bool) -> Gate:
    runs = app.runs
    # The page carries the token for its script to send; only a request that already had it gets the page.
    html = (STATIC / "index.html").read_text(encoding="utf-8").replace(
        "<head>", f'<head>\n<meta name="tuneforge-token" content="{token}">', 1)

    def page(_request):
        return HTMLResponse(html, headers={"Cache-Control": "no-store"})

    def known(name: str) -> str:
        if not (runs.folder(name).is_dir() or runs.side(name).is_dir()):
            raise NotFound(f"there is no run named {name!r} (its folder may have been deleted)",
                           runs.display(runs.folder(name)), fix="see the Runs page for the runs there are")
        return name

    async def options(_request):
        return Json(app.options())

    async def resolve(request):  # the parser, in a worker thread: the page's other requests go on meanwhile
        name, cfg = await run_in_threadpool(app.resolve, await _body(request))
        return Json({"name": name, "yaml": config.to_yaml(cfg)})

    def estimate_sync(body: dict) -> dict:
        _name, cfg = app.resolve(body)
        return app.estimator(cfg, app.examples(cfg))

    async def estimate(request):
        return Json(await run_in_threadpool(estimate_sync, await _body(request)))

    def start_checked(body: dict) -> tuple[str, RunCfg]:
        name, cfg = app.resolve(body)
        app.examples(cfg, starting=True)  # what would stop the run at once stops it here, the run name unused
        return name, cfg

    async def start(request):
        name, cfg = await run_in_threadpool(start_checked, await _body(request))
        runs.start(name, config.to_yaml(cfg))
        return Json({"name": name, "url": f"/runs/{name}"})

    def runs_list(_request):
        out = []
        for name in runs.names():
            try:
                out.append(runs.row(name))
            except OSError as exc:  # a folder deleted while it was read
                out.append({"name": name, "status": "failed", "detail": f"could not read it: {exc.strerror}"})
        return Json({"runs": out, "runs_dir": runs.display(runs.root)})

    def run_detail(request):
        name = known(request.path_params["name"])
        row = runs.row(name)
        records, dropped = runs.metrics(name)
        stoppable = runs.child(name) is not None or runs.earlier_child(name) is not None
        return Json({**row, "config": runs.config_text(name), "summary": runs.summary(name), "log": runs.log(name),
                     "launched_here": runs.side(name).is_dir(), "stoppable": stoppable,
                     "stop_note": runs.not_stoppable(name).line() if row["status"] == "running" and not stoppable
                     else None, "folder": runs.display(runs.folder(name)), "dropped": dropped})

    def run_metrics(request):
        name = known(request.path_params["name"])
        records, dropped = runs.metrics(name)
        keep = ("step", "loss", "eval_loss", "eval_accuracy")
        return Json({"records": [{k: r[k] for k in keep if k in r} for r in records], "dropped": dropped})

    def stop(request):
        pid = runs.stop(known(request.path_params["name"]))
        return Json({"stopped": pid})

    def resume(request):
        name = known(request.path_params["name"])
        app.resume(name)
        return Json({"resumed": name})

    async def compare(request):
        names = (await _body(request)).get("runs")
        if not isinstance(names, list) or not names:
            raise UserError("no runs chosen", "Compare", fix="tick the runs to compare")
        for name in names:
            known(name)
        return Json(await run_in_threadpool(app.compare, names))

    def compare_png(request):
        key = request.path_params["key"]
        path = app.compare_dir(key) / "compare.png" if key.isalnum() and len(key) == 12 else None
        if path is None or not path.is_file():
            raise NotFound("no such chart", "Compare", fix="compare the runs again")
        return FileResponse(path)

    def try_info(request):  # a POST: it loads a model
        return Json(app.playground.get(known(request.path_params["name"])).info())

    async def try_classify(request):
        name, body = known(request.path_params["name"]), await _body(request)
        return Json({"labels": await run_in_threadpool(app.playground.classify, name, str(body.get("text") or ""))})

    async def try_generate(request):
        name, body = known(request.path_params["name"]), await _body(request)
        try:
            max_new = int(body.get("max_new_tokens") or 64)
        except (TypeError, ValueError, OverflowError):
            raise UserError("max new tokens must be a whole number", "Try", fix="write a number such as 64") from None
        pieces = await run_in_threadpool(app.playground.generate, name, str(body.get("text") or ""),
                                         max(1, min(max_new, 2048)), str(body.get("system") or ""))
        return StreamingResponse(pieces, media_type="text/plain; charset=utf-8")

    async def user_error(_request, exc):
        return _error(exc)

    async def crash(_request, exc):  # anything else: said on the page; the server goes on
        traceback.print_exception(exc, file=sys.stderr)
        return Json({"error": f"internal error: {type(exc).__name__}: {exc}"}, status_code=500)

    routes = [
        *(Route(p, page) for p in ("/", "/runs", "/runs/{name}", "/compare", "/try")),
        Mount("/static", StaticFiles(directory=STATIC)),
        Route("/api/options", options),
        Route("/api/resolve", resolve, methods=["POST"]),
        Route("/api/estimate", estimate, methods=["POST"]),
        Route("/api/start", start, methods=["POST"]),
        Route("/api/runs", runs_list),
        Route("/api/runs/{name}", run_detail),
        Route("/api/runs/{name}/metrics", run_metrics),
        Route("/api/runs/{name}/stop", stop, methods=["POST"]),
        Route("/api/runs/{name}/resume", resume, methods=["POST"]),
        Route("/api/compare", compare, methods=["POST"]),
        Route("/api/compare/{key}/compare.png", compare_png),
        Route("/api/try/{name}", try_info, methods=["POST"]),
        Route("/api/try/{name}/classify", try_classify, methods=["POST"]),
        Route("/api/try/{name}/generate", try_generate, methods=["POST"]),
    ]
    return Gate(Starlette(routes=routes, exception_handlers={UserError: user_error, Exception: crash}), token, local)


def serve(runs_dir: str, data_dirs: list[str], host: str = "127.0.0.1", port: int = 7860) -> None:
    """Serve the page until Ctrl-C; runs it launched go on after it stops."""
    sock = listen(host, port)
    try:
        app = App(runs_dir, data_dirs)
    except UserError:
        sock.close()
        raise
    app.estimator.warm()
    token = secrets.token_urlsafe(24)
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{sock.getsockname()[1]}/?token={token}"
    print(f"tuneforge ui: {url}", flush=True)
    print(f"tuneforge ui: runs in {app.runs.display(app.runs.root)}, data from "
          f"{', '.join(app.runs.display(d) for d in app.data_dirs) or '(none)'}; Ctrl-C stops the page "
          "(runs it started go on)", flush=True)
    server = uvicorn.Server(uvicorn.Config(build(app, token, host in LOCAL_NAMES), log_level="warning",
                                           access_log=False))
    with contextlib.suppress(KeyboardInterrupt):
        server.run(sockets=[sock])


def listen(host: str, port: int) -> socket.socket:
    """The page's socket; what stops it is said of the option at fault: a port out of range, taken or
    kept for root is --port's, a name that does not resolve or an address this machine lacks --host's."""
    if not 0 <= port <= 65535:
        raise UserError(f"{port} is not a port", "--port", fix="choose one from 1 to 65535 (0 takes any free one)")
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (OSError, UnicodeError, ValueError) as exc:  # UnicodeError: a name no DNS label can hold
        reason = exc.strerror if isinstance(exc, OSError) else str(exc)
        raise UserError(f"cannot find the address {host!r}: {reason}", "--host",
                        fix="give an address of this machine, such as 127.0.0.1 (the default)") from None
    try:
        return socket.create_server(address, family=family)
    except OSError as exc:
        if exc.errno in (errno.EADDRINUSE, errno.EACCES):
            raise UserError(f"cannot listen on {host}:{port}: {exc.strerror}", "--port", fix="choose another port "
                            "with --port (0 takes any free one), or stop what uses it") from None
        raise UserError(f"cannot listen on {host}: {exc.strerror}", "--host",
                        fix="give an address of this machine, such as 127.0.0.1 (the default)") from None
