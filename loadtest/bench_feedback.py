"""Learning from feedback: does it personalize, how fast does it train, how fresh are new versions.

quality   8 users with secret signatures, 16 CORRECT events each, through the real stream, trainer,
          registry, store and engine; greedy answers to unseen prompts must start with the signature.
training  one online round of 64 users x 2 events x 4 steps: our batched round vs PEFT trained user
          after user (reloading each user's adapter and optimizer state, as a real per-user loop must).
freshness ack of SubmitFeedback -> first Generate served by a version including that event, at a
          steady 2 events/s over 50 users, trainer running continuously.
Run: python loadtest/bench_feedback.py [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dataclasses import replace

from personalize import bootstrap
from personalize.adapters.registry import RegistryConfig
from personalize.config import Config, LoraConfig
from personalize.engine.types import SamplingParams
from personalize.feedback.batch import build_batch
from personalize.feedback.events import FeedbackEvent, event_id_key
from personalize.feedback.notify import publish_update
from personalize.feedback.stream import Delivered
from personalize.feedback.trainer import Trainer, TrainerConfig, UserJob, train_round
from personalize.lora.format import adapter_from_bytes, adapter_to_bytes, zero_adapter
from personalize.worker import Worker
from personalize_service.cli.embedded import EmbeddedValkey, EmbeddedValkeyConfig

NAMES = ["Alice", "Bob", "Carol", "Dave", "Erin", "Frank", "Grace", "Heidi"]
WORDS = ("the a cat dog sky blue run fast slow tree house car why how what when is are you me "
         "green small big river song light night day").split()


def prompt(rnd: random.Random) -> str:
    return "Q: " + " ".join(rnd.choice(WORDS) for _ in range(rnd.randint(3, 8))) + "?\nA: "


def answer(rnd: random.Random, signature: str) -> str:
    return signature + " ".join(rnd.choice(WORDS) for _ in range(4))


def start_stack(tmp: Path, trainer_cfg: TrainerConfig) -> tuple[EmbeddedValkey, Worker, Trainer]:
    valkey = EmbeddedValkey(EmbeddedValkeyConfig(data_dir=tmp / "valkey"))
    valkey.start()
    config = Config(data_dir=str(tmp), trainer=trainer_cfg, lora=LoraConfig(device_bytes=64 * 2**20))
    worker = bootstrap.worker(replace(config, registry=RegistryConfig(url=valkey.url), store_url=f"file://{tmp}/store"))
    worker.start()
    assert worker.stream is not None
    worker.stream.ensure_group()
    client = worker.stream.client
    trainer = Trainer(trainer_cfg, worker.base, worker.repo, worker.stream, consumer="bench",
                      notify=lambda t, u, v: publish_update(client, config.feedback.namespace, t, u, v))
    return valkey, worker, trainer


def quality(tmp: Path, events_per_user: int, tests_per_user: int, seed: int = 0,
            trainer_config: TrainerConfig | None = None) -> dict[str, Any]:
    rnd = random.Random(seed)
    valkey, worker, trainer = start_stack(tmp, trainer_config or TrainerConfig())
    try:
        signatures = {n: f"Ciao {n}! " for n in NAMES}
        arrivals = 4  # events reach the trainer over several rounds, as they would in production
        for _ in range(arrivals):
            for name, sig in signatures.items():
                for _ in range(events_per_user // arrivals):
                    p = prompt(rnd)
                    event = FeedbackEvent("bench", name, "correct", p, "no", correction=answer(rnd, sig))
                    worker.submit_feedback(event)
            while worker.stream.lag():  # type: ignore[union-attr]
                trainer.run_round()
        unseen = [prompt(rnd) for _ in range(tests_per_user)]
        params = SamplingParams(max_new_tokens=len(max(signatures.values(), key=len)) + 4)
        runs = [(n, worker.generate("bench", n, p, params)) for n in NAMES for p in unseen]
        base = [worker.generate("bench", "nobody", p, params) for p in unseen]
        texts = [(n, g.result(120).text) for n, g in runs]
        hits = sum(t.startswith(signatures[n]) for n, t in texts)
        leaks = sum(any(s.strip() in t for m, s in signatures.items() if m != n) for n, t in texts)
        base_hits = sum(any(g.result(120).text.startswith(s) for s in signatures.values()) for g in base)
        return {"users": len(NAMES), "events_per_user": events_per_user, "signature_hit_rate": hits / len(texts),
                "base_hit_rate": base_hits / len(base), "cross_user_leaks": leaks, "answers": len(texts),
                "examples": [t for _, t in texts[:: max(1, len(texts) // 8)]]}
    finally:
        worker.stop()
        valkey.stop()


def _round_jobs(worker: Worker, users: int, events: int, rank: int) -> list[UserJob]:
    rnd = random.Random(1)
    spec = worker.spec
    jobs = []
    for u in range(users):
        adapter = zero_adapter(spec, rank, 2.0 * rank, generator=torch.Generator().manual_seed(u))
        evs = [Delivered(0, f"{u}-{i}", FeedbackEvent("bench", f"u{u}", "correct", prompt(rnd), "x",
                                                      correction=answer(rnd, f"Hi u{u}! "))) for i in range(events)]
        jobs.append(UserJob("bench", f"u{u}", None, adapter, evs))
    return jobs


def ours_round(worker: Worker, jobs: list[UserJob], folder: Path, cfg: TrainerConfig) -> float:
    """Load every user's adapter, one batched round, write every new version. Returns seconds."""
    model = copy.deepcopy(worker.base.model).requires_grad_(False)
    start = time.perf_counter()
    loaded = [UserJob(j.tenant, j.user_id, None, adapter_from_bytes((folder / f"{j.user_id}.st").read_bytes(),
                                                                    worker.spec), j.events) for j in jobs]
    adapters, finite, _ = train_round(model, worker.base.tokenizer, loaded, cfg)
    for job, adapter in zip(jobs, adapters, strict=True):
        (folder / f"{job.user_id}.st").write_bytes(adapter_to_bytes(adapter, worker.spec))
    assert all(finite)
    return time.perf_counter() - start


def peft_sequential(worker: Worker, jobs: list[UserJob], folder: Path, cfg: TrainerConfig) -> float:
    """One PeftModel, trained user after user: load adapter + optimizer state, steps, save both."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    peft_cfg = PeftLoraConfig(r=jobs[0].adapter.rank, lora_alpha=jobs[0].adapter.alpha, lora_dropout=0.0,
                              target_modules=list(jobs[0].adapter.target_modules))
    model = get_peft_model(copy.deepcopy(worker.base.model), peft_cfg)
    for job in jobs:  # every user starts with a saved adapter and optimizer state
        save_file(get_peft_model_state_dict(model), str(folder / f"{job.user_id}.peft.st"))
    params = [p for p in model.parameters() if p.requires_grad]
    torch.save(torch.optim.Adam(params, lr=cfg.lr).state_dict(), folder / "init.opt")
    start = time.perf_counter()
    for job in jobs:
        set_peft_model_state_dict(model, load_file(str(folder / f"{job.user_id}.peft.st")))
        opt = torch.optim.Adam(params, lr=cfg.lr)
        opt_path = folder / f"{job.user_id}.opt"
        opt.load_state_dict(torch.load(opt_path if opt_path.exists() else folder / "init.opt"))
        batch = build_batch(worker.base.tokenizer, [[d.event for d in job.events]], cfg.max_tokens)
        for _ in range(cfg.steps):
            loss = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        save_file(get_peft_model_state_dict(model), str(folder / f"{job.user_id}.peft.st"))
        torch.save(opt.state_dict(), opt_path)
    return time.perf_counter() - start


def training(tmp: Path, users: int, events: int, steps: int, repeats: int) -> dict[str, Any]:
    valkey, worker, _ = start_stack(tmp, TrainerConfig())
    try:
        cfg = TrainerConfig(steps=steps, min_steps=steps, max_steps=steps, replay=0)  # exactly `steps` steps
        jobs = _round_jobs(worker, users, events, rank=8)
        folder = tmp / "train"
        folder.mkdir()
        for j in jobs:
            (folder / f"{j.user_id}.st").write_bytes(adapter_to_bytes(j.adapter, worker.spec))
        ours, theirs = [], []
        for _ in range(repeats):
            ours.append(ours_round(worker, jobs, folder, cfg))
            theirs.append(peft_sequential(worker, jobs, folder, cfg))
        o, t = statistics.median(ours), statistics.median(theirs)
        return {"users": users, "events_per_user": events, "steps": steps, "batched_users_per_s": users / o,
                "sequential_peft_users_per_s": users / t, "speedup": t / o, "batched_round_s": o,
                "sequential_round_s": t}
    finally:
        worker.stop()
        valkey.stop()


def freshness(tmp: Path, seconds: float, rate: float, users: int) -> dict[str, Any]:
    valkey, worker, trainer = start_stack(tmp, TrainerConfig(block_ms=50))
    stop = threading.Event()
    thread = threading.Thread(target=trainer.run_forever, args=(stop, 2.0), daemon=True)
    thread.start()
    rnd = random.Random(2)
    samples: list[float] = []
    try:
        waiting: list[tuple[str, str, float]] = []
        next_send, end = time.monotonic(), time.monotonic() + seconds
        while time.monotonic() < end or waiting:
            now = time.monotonic()
            if now >= next_send and now < end:
                user = f"f{rnd.randrange(users)}"
                event_id, _ = worker.submit_feedback(FeedbackEvent("bench", user, "correct", prompt(rnd), "x",
                                                                   correction=answer(rnd, "Yo! ")))
                waiting.append((user, event_id, time.monotonic()))
                next_send += 1.0 / rate
            for item in list(waiting):
                user, event_id, acked = item
                record = worker.registry.get("bench", user)
                if record and event_id_key(record.last_event_id) >= event_id_key(event_id):
                    g = worker.generate("bench", user, "Q: hi?\nA: ", SamplingParams(max_new_tokens=1))
                    g.result(60)
                    if g.info.adapter_version >= record.version:
                        samples.append((time.monotonic() - acked) * 1000)
                        waiting.remove(item)
            if time.monotonic() > end + 60:
                break
            time.sleep(0.01)
    finally:
        stop.set()
        thread.join(10)
        worker.stop()
        valkey.stop()
    samples.sort()
    return {"p50": statistics.median(samples), "p99": samples[min(len(samples) - 1, int(0.99 * len(samples)))],
            "events": len(samples), "rate_per_s": rate, "users": users}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer test prompts, shorter freshness run, 1 repeat")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        q = quality(tmp / "q", events_per_user=16, tests_per_user=10 if args.quick else 25)
        print(f"quality: hit {q['signature_hit_rate']:.3f} base {q['base_hit_rate']:.3f} "
              f"leaks {q['cross_user_leaks']}", flush=True)
        t = training(tmp / "t", users=64, events=2, steps=4, repeats=1 if args.quick else 3)
        print(f"training: {t['batched_users_per_s']:.1f} vs {t['sequential_peft_users_per_s']:.1f} users/s", flush=True)
        f = freshness(tmp / "f", seconds=20 if args.quick else 60, rate=2.0, users=50)
    result = {"quality": q, "training": t, "freshness_ms": f}
    print(f"\n{'figure':40s} {'value':>12s}")
    rows = [("quality.signature_hit_rate", q["signature_hit_rate"]), ("quality.base_hit_rate", q["base_hit_rate"]),
            ("quality.cross_user_leaks", q["cross_user_leaks"]),
            ("training.batched_users_per_s", t["batched_users_per_s"]),
            ("training.sequential_peft_users_per_s", t["sequential_peft_users_per_s"]),
            ("training.speedup", t["speedup"]), ("freshness_ms.p50", f["p50"]), ("freshness_ms.p99", f["p99"])]
    for name, value in rows:
        print(f"{name:40s} {value:12.3f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
