"""Security checks (SECURITY.md): no shell, remote code only on request, uploads kept
under the run directory with safe names, localhost by default, --auth, demo limits
enforced by the server.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import free_port

REPO = Path(__file__).resolve().parent.parent
SKIP_DIRS = {".venv", ".venv-ci", ".venv-sky", ".git", "runs", "build", "dist", "node_modules", "__pycache__", ".team"}


def _repo_python_files() -> list[Path]:
    files = []
    for path in REPO.rglob("*.py"):
        if SKIP_DIRS & set(path.relative_to(REPO).parts):
            continue
        files.append(path)
    return files


def test_the_scan_sees_the_project():
    names = {p.relative_to(REPO).as_posix() for p in _repo_python_files()}
    # If the walk found nothing, the scans below would pass vacuously.
    assert {"cli.py", "advisor/plan.py", "trainer/events.py", "tests/test_security.py"} <= names


def test_no_shell_true_anywhere():
    # Built from pieces so this file's own source does not match.
    pattern = re.compile(r"""shell['"]?\s*[=:]\s*""" + "True")
    offenders = []
    for path in _repo_python_files():
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not offenders, "a shell is requested here:\n" + "\n".join(offenders)


def test_trust_remote_code_is_never_hard_wired_on():
    # Every place that passes trust_remote_code to a library must pass the plan's value,
    # not a literal True; tests may use literals to build plans.
    pattern = re.compile(r"trust_remote_code\s*=\s*" + "True")
    offenders = []
    for path in _repo_python_files():
        if path.relative_to(REPO).parts[0] == "tests":
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not offenders, "trust_remote_code hard-wired on:\n" + "\n".join(offenders)


def test_plan_keeps_remote_code_off_by_default():
    from advisor.plan import Plan

    assert Plan().model.trust_remote_code is False
    assert Plan.from_yaml("model:\n  name: demo\n").model.trust_remote_code is False
    assert Plan.from_yaml("model:\n  trust_remote_code: true\n").model.trust_remote_code is True


def test_trust_remote_code_reaches_from_pretrained_only_when_the_plan_asks(make_plan, monkeypatch):
    import transformers

    from trainer import models

    seen: dict[str, list] = {"model": [], "tokenizer": []}
    real_model = transformers.AutoModelForCausalLM.from_pretrained.__func__
    real_tokenizer = transformers.AutoTokenizer.from_pretrained.__func__

    def spy_model(cls, *args, **kwargs):
        seen["model"].append(kwargs.get("trust_remote_code", "absent"))
        return real_model(cls, *args, **kwargs)

    def spy_tokenizer(cls, *args, **kwargs):
        seen["tokenizer"].append(kwargs.get("trust_remote_code", "absent"))
        return real_tokenizer(cls, *args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", classmethod(spy_model))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", classmethod(spy_tokenizer))

    plan = make_plan()
    assert plan.model.trust_remote_code is False
    models.load_tokenizer(plan)
    models.load_model(plan)
    assert seen == {"model": [False], "tokenizer": [False]}

    asked = make_plan(model__trust_remote_code=True)
    models.load_tokenizer(asked)
    models.load_model(asked)
    assert seen == {"model": [False, True], "tokenizer": [False, True]}


def test_the_trainer_warns_when_remote_code_is_on(make_plan, tmp_path):
    from trainer.context import RunContext
    from trainer.events import EventWriter, read_all_events
    from trainer.runner import preflight

    def notices(plan, name):
        run_dir = tmp_path / name
        ctx = RunContext(plan=plan, run_dir=run_dir, events=EventWriter(run_dir / "events.jsonl"))
        preflight(ctx)
        return [e["message"] for e in read_all_events(run_dir / "events.jsonl") if e["event"] == "notice"]

    assert not [m for m in notices(make_plan(), "off") if "trust_remote_code" in m]
    (warning,) = [m for m in notices(make_plan(model__trust_remote_code=True), "on") if "trust_remote_code" in m]
    assert warning.startswith("warning:") and "own Python code" in warning


# -- the served app ------------------------------------------------------------------------------------------

import os  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402


def _serve(work: Path, *extra: str):
    """`python app.py` from `work` (runs in work/runs); returns (process, url) once the port answers."""
    import urllib.error
    import urllib.request

    port = free_port()
    env = {**os.environ, "GRADIO_TEMP_DIR": str(work / "gradio-tmp"), "HF_HUB_OFFLINE": "1"}
    env.pop("TUNEWISE_RUNS_DIR", None)
    env.pop("SPACE_ID", None)
    log = open(work / "app.log", "w")
    proc = subprocess.Popen([sys.executable, str(REPO / "app.py"), "--port", str(port), *extra], cwd=work, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 150
    quiet_until = time.time() + 90  # as conftest.start_app: ask once Gradio's own startup check has passed
    while True:
        assert proc.poll() is None, (work / "app.log").read_text()[-3000:]
        if time.time() < quiet_until and "To create a public link" not in (work / "app.log").read_text(errors="replace"):
            time.sleep(0.3)
            continue
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return proc, url
        except urllib.error.HTTPError:
            return proc, url  # it answers (a login page, or an error status): it serves
        except OSError:
            assert time.time() < deadline, "app.py did not serve within 150 s"
            time.sleep(0.3)


def _shutdown(proc) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def _listening_addresses(port: int) -> set[str]:
    """Local addresses (hex, as /proc/net shows them) with a LISTEN socket on `port`."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, _remote, state = line.split()[1:4]
            address, port_hex = local.split(":")
            if state == "0A" and int(port_hex, 16) == port:
                found.add(address)
    return found


def test_app_binds_to_localhost_by_default_and_auth_guards_every_route(tmp_path):
    import httpx
    from gradio_client import Client

    import app

    assert app.parse_args([]).host == "127.0.0.1"
    proc, url = _serve(tmp_path, "--auth", "alice:s3cret-pw")
    try:
        port = int(url.rstrip("/").rsplit(":", 1)[1])
        if Path("/proc/net/tcp").is_file():
            # 0100007F is 127.0.0.1 (little-endian hex); ::1 would be 00000000000000000000000001000000.
            assert _listening_addresses(port) <= {"0100007F", "00000000000000000000000001000000"}
            assert _listening_addresses(port), "no listening socket found for the app's port"

        # Without credentials: no config, no API description, no upload, no call, and none of the routes
        # Gradio leaves open itself (cancel and reset answered {"success": true} to anyone).
        cancel = {"event_id": "x", "session_hash": "y", "fn_index": 0}
        closed = [("GET", "config"), ("GET", "gradio_api/info"), ("POST", "gradio_api/upload"),
                  ("POST", "gradio_api/call/model_info"), ("POST", "gradio_api/cancel"), ("POST", "gradio_api/reset"),
                  ("GET", "gradio_api/heartbeat/x"), ("GET", "gradio_api/app_id"), ("GET", "gradio_api/user"),
                  ("GET", "gradio_api/token"), ("GET", "openapi.json"), ("GET", "monitoring"),
                  ("GET", "gradio_api/queue/status"), ("GET", "gradio_api/file=" + str(tmp_path / "app.log"))]
        for method, route in closed:
            body = {"data": ["demo"]} if "call" in route else cancel if method == "POST" else None
            answer = httpx.request(method, url + route, json=body)
            assert answer.status_code == 401, (route, answer.status_code, answer.text[:200])
            assert "success" not in answer.text, (route, answer.text[:200])
        # The login page itself (and what it loads) still answers, so a person can log in.
        for route in ("", "theme.css", "manifest.json"):
            assert httpx.get(url + route).status_code == 200, route
        assert httpx.post(url + "login", data={"username": "alice", "password": "wrong"}).status_code == 400
        with pytest.raises(Exception, match="credentials"):
            Client(url, verbose=False)
        # With them, the API works, and so do the routes closed above.
        client = Client(url, auth=("alice", "s3cret-pw"), verbose=False)
        card = client.predict("demo", api_name="/model_info")
        assert "parameters" in card
        assert httpx.post(url + "gradio_api/cancel", json=cancel, cookies=client.cookies).json() == {"success": True}
        assert httpx.get(url + "gradio_api/app_id", cookies=client.cookies).status_code == 200
    finally:
        _shutdown(proc)
    # An --auth without a password is refused at start.
    refused = subprocess.run([sys.executable, str(REPO / "app.py"), "--auth", "alice"], capture_output=True, text=True,
                             timeout=60, cwd=tmp_path)
    assert refused.returncode == 2 and "--auth must be USER:PASS" in refused.stderr


@pytest.mark.parametrize(
    "name, safe",
    [
        ("../../etc/passwd", "passwd"),
        ("..\\..\\windows\\win.ini", "_.._windows_win.ini"),
        (".bashrc", "bashrc"),
        ("data set; rm -rf ~.jsonl", "data_set_rm_-rf_.jsonl"),
        ("", "upload"),
        ("...", "upload"),
        ("日本語.jsonl", "_.jsonl"),
        # The suffix survives: the profile reads a file by it.
        ("a" * 300 + ".jsonl", "a" * 114 + ".jsonl"),
        ("....jsonl", "upload.jsonl"),
        (".csv", "upload.csv"),
    ],
)
def test_upload_names_are_sanitized(name, safe):
    from trainer.runs import sanitize_filename

    cleaned = sanitize_filename(name)
    assert cleaned == safe
    assert "/" not in cleaned and "\\" not in cleaned and not cleaned.startswith(".")


def test_keep_upload_stores_under_the_runs_folder_and_enforces_the_demo_size(tmp_path):
    from advisor.errors import DatasetError
    from advisor.wizard import DemoLimits
    from trainer.runs import keep_upload

    runs = tmp_path / "runs"
    limit = DemoLimits().max_upload_bytes
    odd = tmp_path / "in" / "..evil name;$(id).jsonl"
    odd.parent.mkdir()
    odd.write_text('{"text": "hello"}\n')
    kept = keep_upload(runs / "_uploads", str(odd), max_bytes=limit)
    assert kept.resolve().is_relative_to((runs / "_uploads").resolve())
    assert kept.name == "evil_name_id_.jsonl" and kept.read_text() == '{"text": "hello"}\n'
    big = tmp_path / "in" / "big.jsonl"
    with open(big, "wb") as handle:
        handle.truncate(20_000_001)
    with pytest.raises(DatasetError, match="up to 20 MB"):
        keep_upload(runs / "_uploads", str(big), max_bytes=limit)
    assert not list(runs.rglob("big.jsonl"))


@pytest.fixture(scope="module")
def demo_app(tmp_path_factory):
    from gradio_client import Client

    work = tmp_path_factory.mktemp("demo-app")
    proc, url = _serve(work, "--demo-mode")
    try:
        yield url, Client(url, verbose=False), work
    finally:
        from trainer import supervisor

        if (work / "runs").is_dir():
            for run in supervisor.list_runs(work / "runs"):
                if run.active:
                    supervisor.stop(run.run_id, runs_dir=work / "runs", timeout=20)
        _shutdown(proc)


def test_uploaded_file_with_a_traversal_name_lands_under_the_runs_folder(demo_app):
    import httpx

    url, client, work = demo_app
    before = set(Path("/etc").iterdir())
    sent = httpx.post(url + "gradio_api/upload", files={"files": ("../../etc/tunewise-test.jsonl", b'{"text": "x"}\n')})
    assert sent.status_code == 200, sent.text
    (cached,) = sent.json()
    answer = _raw_call(url, "upload", [{"path": cached, "meta": {"_type": "gradio.FileData"},
                                        "orig_name": "../../etc/tunewise-test.jsonl"}])
    assert answer.startswith("event: complete"), answer
    (kept,) = (work / "runs" / "_uploads").rglob("tunewise-test.jsonl")
    assert kept.resolve().is_relative_to((work / "runs" / "_uploads").resolve()), kept
    assert kept.name == "tunewise-test.jsonl" and kept.read_bytes() == b'{"text": "x"}\n'
    assert set(Path("/etc").iterdir()) == before


def _raw_call(url: str, endpoint: str, data: list) -> str:
    """Call an API endpoint over plain HTTP (gradio_client would upload local files itself); the event stream."""
    import httpx

    started = httpx.post(f"{url}gradio_api/call/{endpoint}", json={"data": data}, timeout=30)
    assert started.status_code == 200, started.text
    with httpx.stream("GET", f"{url}gradio_api/call/{endpoint}/{started.json()['event_id']}", timeout=60) as stream:
        return "".join(stream.iter_text())


def test_an_api_call_cannot_make_the_app_copy_a_server_file(demo_app, tmp_path):
    import httpx

    url, _client, work = demo_app
    secret = tmp_path / "secret.jsonl"  # a server file with an accepted suffix, never uploaded
    secret.write_text('{"text": "private"}\n')
    refused = _raw_call(url, "upload", [{"path": str(secret), "meta": {"_type": "gradio.FileData"}}])
    assert refused.startswith("event: error"), refused
    assert not list(work.rglob("secret.jsonl"))
    # The same call with a file that was uploaded goes through (so the refusal above was the path check).
    sent = httpx.post(url + "gradio_api/upload", files={"files": ("mine.jsonl", b'{"text": "mine"}\n')}).json()
    accepted = _raw_call(url, "upload", [{"path": sent[0], "meta": {"_type": "gradio.FileData"}}])
    assert accepted.startswith("event: complete"), accepted
    assert [p.read_text() for p in (work / "runs" / "_uploads").rglob("mine.jsonl")] == ['{"text": "mine"}\n']


def test_demo_limits_are_enforced_by_the_server(demo_app):
    import yaml
    from gradio_client.exceptions import AppError

    from trainer import supervisor

    url, client, work = demo_app
    runs = work / "runs"
    with pytest.raises(AppError, match="model.name"):
        client.predict(model="HuggingFaceTB/SmolLM2-135M", max_steps=5, api_name="/launch")
    with pytest.raises(AppError, match="model.name"):
        client.predict(model=str(REPO / "assets" / "demo-model"), max_steps=5, api_name="/launch")
    with pytest.raises(AppError, match="data.dataset"):
        client.predict(model="demo", dataset=str(REPO / "assets" / "data" / "demo_sft.jsonl"), api_name="/launch")
    # A learning-rate check longer than the demo allows is refused before it starts.
    with pytest.raises(AppError, match=r"the public demo checks for at most 3 minutes"):
        client.predict(model="demo", dataset="demo-sft", pilot_budget="30", api_name="/pilot")
    with pytest.raises(AppError, match="model.name"):  # the budget box's cost reads no folder on the server either
        client.predict(model=str(REPO / "assets" / "demo-model"), pilot_budget="1", api_name="/pilot_budget")
    assert not [p for p in runs.iterdir() if (p / "run.json").is_file()]
    # Too many steps: cut to the demo's bound on the server, whatever the page sent.
    client.predict(model="demo", dataset="demo-sft", method="lora", max_steps=100_000, api_name="/launch")
    try:
        (run_dir,) = [p for p in runs.iterdir() if (p / "run.json").is_file()]
        plan = yaml.safe_load((run_dir / "plan.yaml").read_text())
        from advisor.wizard import DemoLimits

        assert plan["model"]["name"] == "demo" and plan["training"]["max_steps"] == DemoLimits().max_steps
        assert plan["model"]["trust_remote_code"] is False and plan["output"] is None
    finally:
        for run in supervisor.list_runs(runs):
            if run.active:
                supervisor.stop(run.run_id, runs_dir=runs, timeout=20)


# -- the public demo: each visitor sees only their own runs and uploads; no route serves the runs folder ------

SECRET = "SSN 078-05-1120 belongs to alice"


@pytest.fixture(scope="module")
def public_demo(tmp_path_factory):
    """A demo-mode app without a warm worker, where visitor A (a gradio_client session of its own) has
    uploaded a private file and launched a run on it. Yields a dict: url, work, runs, alice (A's client),
    upload (A's /upload answer), run_id."""
    from gradio_client import Client, handle_file

    from trainer import supervisor

    work = tmp_path_factory.mktemp("public-demo")
    proc, url = _serve(work, "--demo-mode", "--no-warm-worker")
    runs = work / "runs"
    try:
        private = work / "outside" / "alice_private.jsonl"
        private.parent.mkdir()
        private.write_text("".join(f'{{"text": "{SECRET} #{i}"}}\n' for i in range(40)))
        alice = Client(url, verbose=False)
        upload = alice.predict(handle_file(str(private)), api_name="/upload")
        alice.predict(model="demo", dataset=upload["value"], method="lora", max_steps=40, seq_len=64,
                      api_name="/launch")
        (run_dir,) = [p for p in runs.iterdir() if (p / "run.json").is_file()]
        yield {"url": url, "work": work, "runs": runs, "alice": alice, "upload": upload, "run_id": run_dir.name}
    finally:
        if runs.is_dir():
            for run in supervisor.list_runs(runs):
                if run.active:
                    supervisor.stop(run.run_id, runs_dir=runs, timeout=20)
        _shutdown(proc)


def test_a_demo_visitor_sees_their_upload_by_name_and_their_run_in_the_history(public_demo):
    import json

    work, run_id = public_demo["work"], public_demo["run_id"]
    upload = public_demo["upload"]
    # The dropdown gets the file's name, never where the server keeps it.
    assert upload["value"] == "alice_private.jsonl"
    assert str(work) not in json.dumps(upload) and "_uploads" not in json.dumps(upload)
    # The run trains on its own copy of the upload, and the history names the file, not the copy's path.
    copy = work / "runs" / run_id / "data" / "alice_private.jsonl"
    assert SECRET in copy.read_text()
    history, choice, _compare = public_demo["alice"].predict(api_name="/runs")
    (row,) = history["data"]
    row = dict(zip(history["headers"], row))
    assert row["run"] == run_id and row["what"] == "sft lora on demo with alice_private.jsonl"
    assert choice["choices"] == [[run_id, run_id]]


def test_another_demo_visitor_cannot_list_watch_stop_or_use_a_run_or_upload(public_demo):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    from trainer import supervisor

    url, runs, run_id = public_demo["url"], public_demo["runs"], public_demo["run_id"]
    bob = Client(url, verbose=False)
    history, choice, compare = bob.predict(api_name="/runs")
    assert history["data"] == [] and choice["choices"] == [] and compare["choices"] == []
    opened = bob.predict(api_name="/attach")  # opening the page attaches to no one else's run
    assert run_id not in str(opened)
    for endpoint, args in (("/watch", (run_id,)), ("/overlay", ([run_id], "loss")), ("/samples", (run_id, "hi")),
                           ("/export", (run_id, False)), ("/chat", (run_id, None, "hi", [], [], "", 0.0, 1.0, 8, False)),
                           ("/load_run_plan", (run_id,))):
        with pytest.raises(AppError) as refused:
            bob.predict(*args, api_name=endpoint)
        assert run_id in str(refused.value) and "not in the list" in str(refused.value), (endpoint, refused.value)
    with pytest.raises(AppError, match="nothing to stop"):
        bob.predict(api_name="/stop")
    assert "no run selected" in str(bob.predict(api_name="/log_tail"))
    # Alice's upload is hers: neither its name nor its path on the server gets Bob anywhere.
    (kept,) = (runs / "_uploads").rglob("alice_private.jsonl")
    for name in ("alice_private.jsonl", str(kept)):
        with pytest.raises(AppError, match="data.dataset") as refused:
            bob.predict(dataset=name, model="demo", api_name="/profile")
        assert SECRET not in str(refused.value)
        with pytest.raises(AppError, match="data.dataset"):
            bob.predict(model="demo", dataset=name, max_steps=5, api_name="/launch")
    # Bob's own launch waits for the demo's one run, without being told whose it is or what it trains on.
    state = supervisor.status(run_id, runs).state
    if state in ("queued", "running"):
        with pytest.raises(AppError, match="one run at a time") as queued:
            bob.predict(model="demo", dataset="demo-sft", max_steps=5, api_name="/launch")
        assert run_id not in str(queued.value) and "alice" not in str(queued.value)
    # None of that stopped Alice's run; Alice herself can.
    assert not (runs / run_id / "STOP").exists()
    assert supervisor.status(run_id, runs).state in ("queued", "running", "finished")
    alice = public_demo["alice"]
    alice.predict(api_name="/stop")
    deadline = time.time() + 120
    while supervisor.status(run_id, runs).state in ("queued", "running") and time.time() < deadline:
        time.sleep(1)
    assert supervisor.status(run_id, runs).state in ("stopped", "finished")


def _run_files(runs: Path) -> list[Path]:
    """Files under the runs folder whose contents a visitor must never get: an upload, a run's data copy,
    its plan, logs, events and records."""
    wanted = ("alice_private.jsonl", "plan.yaml", "stdout.log", "events.jsonl", "run.json", "watcher.log")
    found = [p for p in runs.rglob("*") if p.is_file() and p.name in wanted]
    assert {p.name for p in found} >= {"alice_private.jsonl", "plan.yaml", "stdout.log", "events.jsonl"}, found
    return found


def _file_routes(url: str, path: Path, work: Path) -> list[str]:
    """Every way of naming `path` to Gradio's file routes (absolute, relative to the app's folder, through
    Gradio's own cache folder, URL-encoded), at the API prefix and at the root."""
    from urllib.parse import quote

    names = [str(path), str(path.relative_to(work)), f"{work}/gradio-tmp/../{path.relative_to(work)}",
             quote(str(path), safe="")]
    return [f"{url}{prefix}{route}{name}" for prefix in ("gradio_api/", "") for route in ("file=", "file/")
            for name in names]


def test_no_route_serves_a_file_of_the_runs_folder_in_demo_mode(public_demo):
    import httpx

    work = public_demo["work"]
    for path in _run_files(public_demo["runs"]):
        for address in _file_routes(public_demo["url"], path, work):
            answer = httpx.get(address)
            assert answer.status_code != 200, address
            assert SECRET not in answer.text and "run_id" not in answer.text, address


def test_a_logged_in_app_serves_no_run_files_but_its_export_downloads(tiny_model_dir, tiny_data_dir, tmp_path,
                                                                      monkeypatch):
    import io
    import zipfile

    import httpx
    from gradio_client import Client

    from trainer import supervisor

    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))  # the app's export folder lands here, not in /tmp
    (tmp_path / "tmp").mkdir()
    proc, url = _serve(tmp_path, "--no-warm-worker")
    runs = tmp_path / "runs"
    try:
        client = Client(url, verbose=False, download_files=False)
        client.predict(model=str(tiny_model_dir), dataset=str(tiny_data_dir / "messages.jsonl"), gpu="none",
                       method="lora", precision="fp32", max_steps=2, seq_len=64, micro_batch=4, api_name="/launch")
        (run_dir,) = [p for p in runs.iterdir() if (p / "run.json").is_file()]
        deadline = time.time() + 300
        while supervisor.status(run_dir.name, runs).state in ("queued", "running") and time.time() < deadline:
            time.sleep(1)
        assert supervisor.status(run_dir.name, runs).state == "finished", (run_dir / "stdout.log").read_text()[-2000:]
        client.predict(api_name="/runs")  # fills this session's run list, as opening the history does
        note, archive = client.predict(run_dir.name, False, api_name="/export")
        assert "Merged into" in note
        # The archive downloads through the address the page got ...
        answer = httpx.get(archive["url"], timeout=60)
        assert answer.status_code == 200, answer.text[:300]
        names = zipfile.ZipFile(io.BytesIO(answer.content)).namelist()
        assert "config.json" in names and any(n.endswith(".safetensors") for n in names), names
        # ... and was made outside the runs folder, in the app's own export folder: nothing of the run is
        # served, to a logged-in user either.
        assert not list(runs.rglob("*.zip"))
        assert [p.name for p in (tmp_path / "tmp").glob("tunewise-exports-*/export-*/*.zip")] == \
            [f"{run_dir.name}-merged.zip"]
        served = [p for p in runs.rglob("*") if p.is_file()]
        assert any(p.suffix == ".safetensors" for p in served) and any(p.name == "plan.yaml" for p in served)
        for path in served:
            for address in (f"{url}gradio_api/file={path}", f"{url}gradio_api/file/{path}"):
                assert httpx.get(address).status_code == 403, address
    finally:
        for run in supervisor.list_runs(runs) if runs.is_dir() else []:
            if run.active:
                supervisor.stop(run.run_id, runs_dir=runs, timeout=20)
        _shutdown(proc)


def test_torch_load_is_always_weights_only():
    # A pickle in a checkpoint runs code when loaded; our own loads must refuse anything but tensors.
    calls = []
    for path in _repo_python_files():
        if path.relative_to(REPO).parts[0] == "tests":
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if "torch.load(" in line:
                calls.append((f"{path.relative_to(REPO)}:{number}", "weights_only=True" in line))
    assert all(safe for _, safe in calls), [where for where, safe in calls if not safe]


def test_what_a_browser_keeps_across_a_reload_is_signed_where_it_grants_anything(tmp_path):
    """The wizard's saved record (gr.BrowserState, readable and editable in the browser): its values are
    only values; the runs and uploads it names count only with the server's signature, from the key that
    trainer.runs keeps in the runs folder (0600, one key for every app on that folder)."""
    import json
    import stat

    from advisor import wizard
    from trainer import runs

    secret = runs.session_secret(tmp_path)
    assert runs.session_secret(tmp_path) == secret and len(secret) == 32
    assert stat.S_IMODE((tmp_path / runs.SECRET_FILE).stat().st_mode) == 0o600
    record = wizard.session_record({"model": "demo", "lora_rank": 12, "bogus": 1, "lora_targets": ["q_proj"]},
                                   ["lora_rank", "model"], 4, secret, own=["run-a"], uploads={"d.jsonl": "/u/1/d.jsonl"},
                                   run_id="run-a")
    assert "bogus" not in record["values"] and record["changed"] == ["lora_rank"]  # model is not advised
    good = wizard.restore_session(json.loads(json.dumps(record)), secret)  # (as the browser stores it: JSON)
    assert good.trusted and good.own == ("run-a",) and good.uploads == {"d.jsonl": "/u/1/d.jsonl"} and good.step == 4
    assert good.values["lora_rank"] == 12 and good.values["lora_targets"] == ["q_proj"]
    for forged in ({**record, "own": ["run-b"]}, {**record, "uploads": {"d.jsonl": "/etc/passwd"}},
                   {**record, "run_id": "run-b"}, {**record, "mac": "0" * 64}):
        bad = wizard.restore_session(forged, secret)
        assert not bad.trusted and bad.own == () and bad.uploads is None and bad.run_id is None
        assert bad.values["lora_rank"] == 12 and bad.step == 3  # values kept; no step past the plan
    (tmp_path / "other").mkdir()
    assert not wizard.restore_session(record, runs.session_secret(tmp_path / "other")).trusted  # another server's key
    for junk in (None, [], "x", {"version": 1}, {"version": 1, "values": []}):
        assert wizard.restore_session(junk, secret) is None
    odd = wizard.restore_session({**record, "values": {"lora_rank": {"a": 1}, "learning_rate": float("nan")},
                                  "step": 99}, secret)
    assert odd.values == {"lora_rank": None, "learning_rate": None} and odd.step == 1
