"""launch/serve.py: an OpenAI-compatible server over a MoE model on N ranks.

    torchrun --nproc-per-node 2 launch/serve.py +topology=pcie checkpoint=DIR
    python launch/serve.py server.port=8000          # the tiny model on one CPU process

Like launch/infer.py, everything that can be checked is checked before any process group or
weight exists (config, ``server.*``, checkpoint headers, tokenizer, chat template,
generation_config.json, plan, and on rank 0 that ``server.host:server.port`` can be bound);
an error is one line on rank 0 and exit 2.

Process model (moe_ext.serve.engine): every rank runs ``ServeEngine.run()`` in its main
thread; rank 0 also runs the HTTP server (moe_ext.serve.http, uvicorn) in a thread. SIGTERM
(or SIGINT) on rank 0 drains: new requests get 503, the accepted ones finish, then every
rank exits 0; the other ranks ignore the signal (torchrun forwards it to all of them) and
leave when rank 0 says so. Signalling torchrun itself (Ctrl-C) drains the same way, but
torchrun kills workers still running 30 s later and exits 1 whatever they return: for a
long drain and exit 0, signal rank 0 (the process whose RANK is 0). A rank that dies
makes the next collective fail or time out (``dist_timeout_s``): rank 0 ends the open
streams with an error event, answers 503 while it closes, and every surviving rank exits 1.
"""

from __future__ import annotations

import errno
import logging
import signal
import socket
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, NoReturn, Optional

import torch
import torch.distributed as dist
from omegaconf import DictConfig

from moe_ext.cli.generation_config import read_generation_config, stop_ids
from moe_ext.cli.infer import infer_dtype, load_on_every_rank, model_source_and_tokenizer
from moe_ext.config import DEFAULT_SERVE_CONTEXT, GenerateConf, ServeConf
from moe_ext.dist import DistEnv
from moe_ext.launching import (
    ModelSource,
    UsageError,
    device_type_for,
    launch_plan,
    launcher_main,
    prepare_job,
    start_ranks,
)
from moe_ext.plan import ParallelPlan
from moe_ext.serve.chat import ChatTemplate, load_chat_template
from moe_ext.topology import Topology

log = logging.getLogger("moe_ext.serve")
GIL_SWITCH_INTERVAL_S = 0.0005  # rank 0's (engine and HTTP threads); CPython's default: 0.005
FAILURE_LINGER_S = 2.0  # rank 0 answers 503 this long after the engine failed, then exits


@dataclass
class ServeJob:
    """Everything decided before process groups exist; identical on every rank. Carries
    the fields moe_ext.cli.infer.load_on_every_rank reads (source, plan, dtype, verify)."""

    device_type: str
    dtype: torch.dtype
    source: ModelSource
    tokenizer: Any
    chat_template: Optional[ChatTemplate]
    topology: Topology
    plan: ParallelPlan
    model_name: str
    max_context: int
    temperature: float  # request defaults: generation_config.json, else greedy
    top_p: float
    sampling: str  # the launcher's line about them
    stop_ids: list[int]  # the model's EOS ids (a request's ignore_eos drops them)
    verify: bool = False


def prepare(cfg: ServeConf, env: DistEnv, cuda_available: bool, num_local_gpus: int) -> ServeJob:
    """Validate the whole server and decide the plan; no process group, no weight. Rank 0
    alone also checks that it can listen on ``server.host:server.port``."""
    cfg.server.check()
    device_type = device_type_for(cfg.device, cuda_available)
    dtype = infer_dtype(cfg.dtype, device_type)
    if env.rank == 0:
        check_address(cfg.server.host, cfg.server.port)
    source, tokenizer = model_source_and_tokenizer(cfg.checkpoint, cfg.model)
    template = load_chat_template(source.checkpoint, source.tokenizer_spec)
    generation_file = read_generation_config(source.checkpoint)
    sampling = GenerateConf().with_sampling(generation_file.sampling_defaults())
    stops = stop_ids(generation_file, source.args.eos_token_id, tokenizer.eos_id) or []
    max_context = serve_context(cfg.server.max_context, source.args.max_position_embeddings)
    rows = cfg.server.max_batch_size
    topology, plan = launch_plan(
        cfg,
        env,
        device_type,
        num_local_gpus,
        source.args,
        dtype,
        tokens_per_step=rows,
        batch=rows,
        prompt_len=max_context,
    )
    line = (
        f"request defaults: temperature={sampling.temperature:g} top_p={sampling.top_p:g} "
        f"({'generation_config.json' if generation_file.sampling_defaults() else 'greedy'}); "
        f"top_k is not served"
    )
    return ServeJob(
        device_type,
        dtype,
        source,
        tokenizer,
        template,
        topology,
        plan,
        model_name=cfg.server.model_name or source.name or "model",
        max_context=max_context,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        sampling=line,
        stop_ids=stops,
        verify=cfg.checkpoint_verify,
    )


def serve_context(requested: Optional[int], model_context: int) -> int:
    """``server.max_context``, else the model's context capped at DEFAULT_SERVE_CONTEXT."""
    if requested is None:
        return min(model_context, DEFAULT_SERVE_CONTEXT)
    if requested > model_context:
        raise UsageError(
            f"server.max_context={requested} is over the model's context of {model_context}; "
            f"lower it to at most {model_context}"
        )
    return requested


def check_address(host: str, port: int) -> None:
    """Refuse, before any weight loads, an address this process cannot listen on."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        raise UsageError(
            f"server.host={host} does not resolve ({err.strerror}); give an address of this "
            f"machine, e.g. server.host=127.0.0.1 or 0.0.0.0"
        ) from err
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(address)
        except OSError as err:
            hint = (
                "another process listens there; stop it or choose another server.port="
                if err.errno == errno.EADDRINUSE
                else "choose another server.host= / server.port="
            )
            raise UsageError(f"cannot listen on {host}:{port} ({err.strerror}); {hint}") from err


def run(cfg: ServeConf, env: DistEnv) -> int:
    """The whole server on this rank: validate, set up groups, load, serve until drained."""
    from moe_ext.serve.engine import ProfileWindow, ServeEngine

    job = prepare_job(prepare, cfg, env, log)
    if env.rank == 0:
        log.info("%s", job.sampling)
        log.info("chat template: %s", job.chat_template.where if job.chat_template else "none")
    device, groups = start_ranks(
        job.plan, env, job.device_type, cfg.dist_timeout_s, cfg.preflight, cfg.debug
    )
    torch.manual_seed(cfg.seed)
    model = load_on_every_rank("native", job, groups, env.rank, device)
    timeout = timedelta(seconds=cfg.dist_timeout_s)
    control = dist.new_group(backend="gloo", timeout=timeout) if env.world_size > 1 else None
    engine = ServeEngine(
        model,
        control,
        model_name=job.model_name,
        rows=cfg.server.max_batch_size,
        max_context=job.max_context,
        prefill_chunk=cfg.server.prefill_chunk,
        max_queue=cfg.server.max_queue,
        stop_ids=job.stop_ids,
        seed=cfg.seed,
        cuda_graphs=cfg.server.cuda_graphs,
        compile_decode=cfg.server.compile_decode,
        profile=(
            ProfileWindow(cfg.server.profile_dir, cfg.server.profile_steps, cfg.server.profile_skip)
            if cfg.server.profile_dir
            else None
        ),
    )
    if env.rank == 0:
        # the engine thread gives up the GIL at every CUDA wait and must win it back from the
        # HTTP thread streaming every request's tokens: at the default 5 ms switch interval
        # each such wait can cost a step up to 5 ms
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    server = start_http(cfg, job, engine) if env.rank == 0 else None
    if not all_started(server is not None or env.rank != 0, control):
        raise UsageError("the HTTP server did not start on rank 0 (its error is above)")
    install_signals(engine if env.rank == 0 else None)
    code = engine.run()
    if server is not None:
        if code != 0:  # clients still polling see 503s and the error events flush
            time.sleep(FAILURE_LINGER_S)
        server.stop()
        log.info("server stopped (%s)", "drained" if code == 0 else "engine failed")
    return code


def start_http(cfg: ServeConf, job: ServeJob, engine: Any) -> Optional[Any]:
    """Rank 0: the HTTP server listening (None, its error logged, if it cannot start)."""
    from moe_ext.serve.http import Defaults, HttpServer, ServerStartError, build_app

    app = build_app(
        engine.client,
        job.tokenizer,
        vocab_size=job.source.args.vocab_size,
        chat_template=job.chat_template,
        defaults=Defaults(temperature=job.temperature, top_p=job.top_p),
    )
    server = HttpServer(app, cfg.server.host, cfg.server.port)
    try:
        server.start()
    except ServerStartError as err:
        log.error("error: %s", err)
        return None
    log.info(
        "serving %s on http://%s:%d/v1 (max_context %d, %d rows per replica)",
        job.model_name,
        cfg.server.host,
        server.bound_port,
        job.max_context,
        cfg.server.max_batch_size,
    )
    return server


def all_started(ok: bool, control: Optional[dist.ProcessGroup]) -> bool:
    """Every rank agrees the server is up (rank 0's HTTP server), else all stop."""
    if control is None:
        return ok
    flag = torch.tensor([0 if ok else 1], dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=control)
    return flag.item() == 0  # sync: a CPU tensor of the gloo control group


def install_signals(engine: Optional[Any]) -> None:
    """SIGTERM / SIGINT: rank 0 drains ``engine`` (from a helper thread, so the handler never
    takes the engine's lock inside the main thread's own critical section); other ranks
    ignore them and leave when rank 0 broadcasts shutdown."""

    def drain(signum, frame) -> None:
        if engine is not None:
            log.info("signal %d: draining (new requests get 503)", signum)
            threading.Thread(target=engine.drain, daemon=True).start()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, drain if engine is not None else signal.SIG_IGN)


def main(cfg: DictConfig, environ: Mapping[str, str]) -> NoReturn:
    """The Hydra main of launch/serve.py: ``environ`` is the process environment."""
    launcher_main(cfg, environ, run, log)
