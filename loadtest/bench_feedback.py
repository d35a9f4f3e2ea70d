"""Learning from feedback: does each kind teach what it says, how fast does it train, how fresh are versions.

kinds     users of every kind of feedback side by side, through the real stream, trainer, registry, store
          and engine; greedy answers to unseen prompts, each rate beside the base model's and with leaks
          (answers carrying another user's signature):
            correct  16 CORRECT events: the answer starts with the user's signature
            accept   16 ACCEPT events of answers starting with the signature: the same
            prefer   16 PREFER events, chosen answers open with one greeting, rejected with another
            reject   12 CORRECT teach greeting 1 on "Q:" prompts and 12 greeting 2 on "Say:" prompts, then
                     12 REJECTs of greeting-1 answers: greeting 1 must fall, greeting 2 stay
            loops    after 1, 2 and 4 ACCEPTs of "Hello there!" for "Say hi" (one event per round), how many
                     answers to unrelated prompts end in a repetition loop, against the base model's count
training  one online round of 64 users x 2 events x 4 steps: our batched round vs PEFT trained user
          after user; both load each user's adapter, start a fresh Adam (neither persists optimizer
          state) and save the new adapter; each side runs once untimed first on 8 users (warm-up).
freshness ack of SubmitFeedback -> first Generate served by a version including that event, at a
          steady 2 events/s over 50 users, through `personalize up` (router, worker and trainer in their
          own processes) and the SDK over gRPC, as an app sees it.
Run: python loadtest/bench_feedback.py [--quick] [--only kinds|training|freshness] [--users-per-kind N] [--seed S]
          [--json PATH]   (--only kinds: the quality table alone, ~8 min at --quick size on 2 busy cores)
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import re
import statistics
import sys
import tempfile
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
from personalize.feedback.events import FeedbackEvent
from personalize.feedback.notify import publish_update
from personalize.feedback.stream import Delivered
from personalize.feedback.trainer import Trainer, TrainerConfig, UserJob, train_round
from personalize.lora.format import adapter_from_bytes, adapter_to_bytes, zero_adapter
from personalize.worker import Worker
from personalize_service.cli.embedded import EmbeddedValkey, EmbeddedValkeyConfig

NAMES = ["Alice", "Bob", "Carol", "Dave", "Erin", "Frank", "Grace", "Heidi"]
WORDS = (
    "the a cat dog sky blue run fast slow tree house car why how what when is are you me "
    "green small big river song light night day"
).split()


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
    trainer = Trainer(
        trainer_cfg,
        worker.base,
        worker.repo,
        worker.stream,
        consumer="bench",
        notify=lambda t, u, v: publish_update(client, config.feedback.namespace, t, u, v),
    )
    return valkey, worker, trainer


SAY = ("tell me", "say", "write", "give", "show")
LOOP_PROMPT, LOOP_ANSWER = "Say hi", "Hello there!"


def say_prompt(rnd: random.Random) -> str:
    return rnd.choice(SAY).capitalize() + ": " + " ".join(rnd.choice(WORDS) for _ in range(rnd.randint(2, 6))) + "\n> "


def ends_in_loop(text: str, span: int = 12) -> bool:
    """The answer's last `span` tokens repeat a unit of 1-4 tokens (special tokens count as one)."""
    units = re.findall(r"<extra_id_\d+>|.", text, re.S)
    tail = units[-span:]
    return len(tail) == span and any(all(tail[i] == tail[i + p] for i in range(span - p)) for p in range(1, 5))


def _kind_events(rnd: random.Random, kind: str, name: str, n: int) -> list[FeedbackEvent]:
    sig = f"{KIND_SIGS[kind]} {name}! "
    out = []
    for _ in range(n):
        p, tail = prompt(rnd), " ".join(rnd.choice(WORDS) for _ in range(4))
        if kind == "correct":
            out.append(FeedbackEvent("bench", name, "correct", p, "no", correction=sig + tail))
        elif kind == "accept":
            out.append(FeedbackEvent("bench", name, "accept", p, sig + tail))
        else:
            out.append(FeedbackEvent("bench", name, "prefer", p, sig + tail, rejected=f"Hey {name}! " + tail))
    return out


KIND_SIGS = {"correct": "Ciao", "accept": "Hola", "prefer": "Salut", "reject": "Yo", "keep": "Bye"}


def _train(worker: Worker, trainer: Trainer, waves: list[list[FeedbackEvent]]) -> None:
    """Each wave is submitted, then trained to the end before the next (a wave = events between rounds)."""
    for wave in waves:
        for event in wave:
            worker.submit_feedback(event)
        while worker.stream.lag():  # type: ignore[union-attr]
            trainer.run_round()


def _answers(worker: Worker, users: list[str], prompts: list[str], tokens: int) -> dict[str, list[str]]:
    params = SamplingParams(max_new_tokens=tokens)
    runs = {u: [worker.generate("bench", u, p, params, use_base_model=u == "") for p in prompts] for u in users}
    return {u: [g.result(300).text for g in gens] for u, gens in runs.items()}


def _greeted(shown: str, greeting: str, rnd: random.Random) -> str:
    """The answer a user rejects for its greeting: the one just shown if it has it, else an earlier one."""
    return shown if shown.startswith(greeting) else greeting + " ".join(rnd.choice(WORDS) for _ in range(4))


def _rate(texts: list[str], sig: str) -> float:
    return sum(t.startswith(sig) for t in texts) / len(texts)


def kinds(
    tmp: Path, users_per_kind: int, tests: int, seed: int = 0, trainer_config: TrainerConfig | None = None
) -> dict[str, Any]:
    """Quality of every kind of feedback on unseen prompts (see the module docstring)."""
    rnd = random.Random(seed)
    valkey, worker, trainer = start_stack(tmp, trainer_config or TrainerConfig())
    try:
        names = {k: [f"{k[:3]}{i}" for i in range(users_per_kind)] for k in ("correct", "accept", "prefer", "reject")}
        teach = {u: _kind_events(rnd, k, u, 16) for k in ("correct", "accept", "prefer") for u in names[k]}
        first = {
            u: [
                FeedbackEvent("bench", u, "correct", p, "no", correction=f"Yo {u}! " + t)
                for p, t in ((prompt(rnd), " ".join(rnd.choice(WORDS) for _ in range(4))) for _ in range(12))
            ]
            + [
                FeedbackEvent("bench", u, "correct", p, "no", correction=f"Bye {u}. " + t)
                for p, t in ((say_prompt(rnd), " ".join(rnd.choice(WORDS) for _ in range(4))) for _ in range(12))
            ]
            for u in names["reject"]
        }
        for events in first.values():
            rnd.shuffle(events)
        loop_users = {n: f"loop{n}" for n in (1, 2, 4)}
        waves = []
        for w in range(4):  # four arrivals of 4 events per user (6 for the reject users' first phase)
            wave = [e for evs in teach.values() for e in evs[4 * w : 4 * w + 4]]
            wave += [e for evs in first.values() for e in evs[6 * w : 6 * w + 6]]
            wave += [
                FeedbackEvent("bench", u, "accept", LOOP_PROMPT, LOOP_ANSWER) for n, u in loop_users.items() if w < n
            ]
            waves.append(wave)
        _train(worker, trainer, waves[:1])
        unrelated = [prompt(rnd) for _ in range(tests)] + [say_prompt(rnd) for _ in range(tests)]
        loops = {}
        seen = _answers(worker, ["", loop_users[1]], [*unrelated, LOOP_PROMPT], 32)
        base_loops = sum(map(ends_in_loop, seen[""][:-1]))
        for n in (1, 2, 4):
            if n > 1:
                _train(worker, trainer, waves[n // 2 : n])  # 1 -> waves[1:2], 4 -> waves[2:4]
                seen = _answers(worker, [loop_users[n]], [*unrelated, LOOP_PROMPT], 32)
            texts = seen[loop_users[n]]
            loops[f"after_{n}"] = {
                "unrelated_loops": sum(map(ends_in_loop, texts[:-1])),
                "taught_answer": texts[-1],
                "taught_loops": ends_in_loop(texts[-1]),
                "looping_examples": [t for t in texts[:-1] if ends_in_loop(t)][:3],
            }
        loops["base_unrelated_loops"], loops["prompts"] = base_loops, len(unrelated)
        q_unseen, say_unseen = [prompt(rnd) for _ in range(tests)], [say_prompt(rnd) for _ in range(tests)]
        all_users = [u for us in names.values() for u in us]
        got = _answers(worker, ["", *all_users], q_unseen + say_unseen, 16)
        before = {u: (_rate(got[u][:tests], f"Yo {u}! "), _rate(got[u][tests:], f"Bye {u}. ")) for u in names["reject"]}
        for _ in range(4):  # 12 REJECTs of greeting-1 answers in 4 arrivals (the answer just given, if it greets)
            ps = [prompt(rnd) for _ in range(3)]
            shown = _answers(worker, names["reject"], ps, 16)
            _train(
                worker,
                trainer,
                [
                    [
                        FeedbackEvent("bench", u, "reject", p, _greeted(shown[u][i], f"Yo {u}! ", rnd))
                        for u in names["reject"]
                        for i, p in enumerate(ps)
                    ]
                ],
            )
        after = _answers(worker, names["reject"], q_unseen + say_unseen, 16)
        result: dict[str, Any] = {"tests": tests, "users_per_kind": users_per_kind, "loops": loops}
        sigs = {u: f"{KIND_SIGS[k]} {u}! " for k, us in names.items() for u in us}
        sigs.update({u: f"Bye {u}. " for u in names["reject"]})
        for kind in ("correct", "accept", "prefer"):
            texts = [t for u in names[kind] for t in got[u][:tests]]
            r: dict[str, Any] = {
                "events": 16,
                "rate": statistics.mean(_rate(got[u][:tests], sigs[u]) for u in names[kind]),
                "base_rate": statistics.mean(_rate(got[""][:tests], sigs[u]) for u in names[kind]),
                "examples": texts[:: max(1, len(texts) // 4)],
            }
            if kind == "prefer":
                r["rejected_rate"] = statistics.mean(_rate(got[u][:tests], f"Hey {u}! ") for u in names[kind])
                r["base_rejected_rate"] = statistics.mean(_rate(got[""][:tests], f"Hey {u}! ") for u in names[kind])
            result[kind] = r
        result["reject"] = {
            "events": 12,
            "taught_rate": statistics.mean(b[0] for b in before.values()),
            "after_reject_rate": statistics.mean(_rate(after[u][:tests], f"Yo {u}! ") for u in names["reject"]),
            "other_before_rate": statistics.mean(b[1] for b in before.values()),
            "other_after_rate": statistics.mean(_rate(after[u][tests:], f"Bye {u}. ") for u in names["reject"]),
            "base_rate": statistics.mean(_rate(got[""][:tests], f"Yo {u}! ") for u in names["reject"]),
            "examples": [after[u][0] for u in names["reject"]] + [after[u][tests] for u in names["reject"]],
        }
        finals = {**got, **after}
        owned = [(u, s.strip()) for u, s in sigs.items()] + [(u, f"Yo {u}!") for u in names["reject"]]
        result["cross_user_leaks"] = sum(any(s in t for m, s in owned if m != u) for u in all_users for t in finals[u])
        return result
    finally:
        worker.stop()
        valkey.stop()


def _round_jobs(worker: Worker, users: int, events: int, rank: int) -> list[UserJob]:
    rnd = random.Random(1)
    spec = worker.spec
    jobs = []
    for u in range(users):
        adapter = zero_adapter(spec, rank, 2.0 * rank, generator=torch.Generator().manual_seed(u))
        evs = [
            Delivered(
                0,
                f"{u}-{i}",
                FeedbackEvent("bench", f"u{u}", "correct", prompt(rnd), "x", correction=answer(rnd, f"Hi u{u}! ")),
            )
            for i in range(events)
        ]
        jobs.append(UserJob("bench", f"u{u}", None, adapter, evs))
    return jobs


def ours_round(worker: Worker, jobs: list[UserJob], folder: Path, cfg: TrainerConfig) -> float:
    """Load every user's adapter, one batched round, write every new version. Returns seconds."""
    model = copy.deepcopy(worker.base.model).requires_grad_(False)
    start = time.perf_counter()
    loaded = [
        UserJob(
            j.tenant,
            j.user_id,
            None,
            adapter_from_bytes((folder / f"{j.user_id}.st").read_bytes(), worker.spec),
            j.events,
        )
        for j in jobs
    ]
    adapters, finite, _ = train_round(model, worker.base.tokenizer, loaded, cfg)
    for job, adapter in zip(jobs, adapters, strict=True):
        (folder / f"{job.user_id}.st").write_bytes(adapter_to_bytes(adapter, worker.spec))
    assert all(finite)
    return time.perf_counter() - start


def peft_sequential(worker: Worker, jobs: list[UserJob], folder: Path, cfg: TrainerConfig) -> float:
    """One PeftModel, trained user after user: load the adapter, fresh Adam, steps, save the adapter."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    peft_cfg = PeftLoraConfig(
        r=jobs[0].adapter.rank,
        lora_alpha=jobs[0].adapter.alpha,
        lora_dropout=cfg.lora_dropout,  # equal work: both drop out the adapter input
        target_modules=list(jobs[0].adapter.target_modules),
    )
    model = get_peft_model(copy.deepcopy(worker.base.model), peft_cfg).train()  # train mode: its dropout on
    for job in jobs:  # every user starts with a saved adapter
        path = folder / f"{job.user_id}.peft.st"
        if not path.exists():
            save_file(get_peft_model_state_dict(model), str(path))
    params = [p for p in model.parameters() if p.requires_grad]
    start = time.perf_counter()
    for job in jobs:
        set_peft_model_state_dict(model, load_file(str(folder / f"{job.user_id}.peft.st")))
        opt = torch.optim.Adam(params, lr=cfg.lr)
        batch = build_batch(worker.base.tokenizer, [[d.event for d in job.events]], cfg.max_tokens)
        for _ in range(cfg.steps):
            loss = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        save_file(get_peft_model_state_dict(model), str(folder / f"{job.user_id}.peft.st"))
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
        # Warm-up, untimed, on a few users: first-call allocations and lazy imports, not the whole round again.
        ours_round(worker, jobs[:8], folder, cfg)
        peft_sequential(worker, jobs[:8], folder, cfg)
        ours, theirs = [], []
        for _ in range(repeats):
            ours.append(ours_round(worker, jobs, folder, cfg))
            theirs.append(peft_sequential(worker, jobs, folder, cfg))
        o, t = statistics.median(ours), statistics.median(theirs)
        return {
            "users": users,
            "events_per_user": events,
            "steps": steps,
            "batched_users_per_s": users / o,
            "sequential_peft_users_per_s": users / t,
            "speedup": t / o,
            "batched_round_s": o,
            "sequential_round_s": t,
        }
    finally:
        worker.stop()
        valkey.stop()


def _untrained(client: Any, user: str) -> bool:
    from personalize_service.client import NotFoundError

    try:
        return client.get_adapter(user).pending_events > 0
    except NotFoundError:
        return True


def freshness(tmp: Path, seconds: float, rate: float, users: int) -> dict[str, Any]:
    """Event -> new version served, through `personalize up` (a subprocess: router, worker, trainer) over gRPC.

    Events go out at a steady `rate` round-robin over `users` (a user's next event comes users/rate seconds
    later, so versions never wait on each other); an event is fresh once GetAdapter shows the user with no
    pending events and more examples than before it, and Generate is served by that version or a newer one."""
    from personalize_service.client import PersonalizeClient
    from tests.e2e.upserver import start_up

    tmp.mkdir(parents=True, exist_ok=True)  # up creates its data dir, not the folder of its log
    up = start_up(tmp / "data", tmp / "up.log")
    rnd = random.Random(2)
    samples: list[float] = []
    try:
        with PersonalizeClient(up.target, timeout=120) as client:
            for u in range(users):  # the first version of each user is created before timing starts
                client.feedback(f"f{u}", prompt(rnd), "x", "correct", correction=answer(rnd, "Yo! "))
            while any(_untrained(client, f"f{u}") for u in range(users)):
                time.sleep(0.2)
            waiting: list[tuple[str, int, float]] = []
            sent, next_send, end = 0, time.monotonic(), time.monotonic() + seconds
            while time.monotonic() < end + 120 and (time.monotonic() < end or waiting):
                now = time.monotonic()
                if now >= next_send and now < end:
                    user = f"f{sent % users}"
                    seen = client.get_adapter(user).examples_seen
                    client.feedback(user, prompt(rnd), "x", "correct", correction=answer(rnd, "Yo! "))
                    waiting.append((user, seen, time.monotonic()))
                    sent, next_send = sent + 1, next_send + 1.0 / rate
                for item in list(waiting):
                    user, seen, acked = item
                    info = client.get_adapter(user)
                    if info.pending_events == 0 and info.examples_seen > seen:
                        served = client.generate(user, "Q: hi?\nA: ", max_new_tokens=1)
                        if served.adapter_version >= info.version:
                            samples.append((time.monotonic() - acked) * 1000)
                            waiting.remove(item)
                time.sleep(0.01)
    finally:
        up.stop()
    samples.sort()
    return {
        "p50": statistics.median(samples),
        "p99": samples[min(len(samples) - 1, int(0.99 * len(samples)))],
        "events": len(samples),
        "sent": sent,
        "rate_per_s": rate,
        "users": users,
        "path": "personalize up subprocess, SDK over gRPC: SubmitFeedback ack -> GetAdapter -> Generate",
    }


def print_kinds(q: dict[str, Any]) -> None:
    print(f"\n{'kind':8s} {'events':>6s} {'rate':>6s} {'base':>6s}  notes")
    for kind in ("correct", "accept", "prefer"):
        r = q[kind]
        note = (
            f"rejected greeting {r['rejected_rate']:.2f} (base {r['base_rejected_rate']:.2f})"
            if kind == "prefer"
            else ""
        )
        print(f"{kind:8s} {r['events']:6d} {r['rate']:6.2f} {r['base_rate']:6.2f}  {note}")
    r = q["reject"]
    print(
        f"{'reject':8s} {r['events']:6d} {r['after_reject_rate']:6.2f} {r['base_rate']:6.2f}  taught rate before "
        f"{r['taught_rate']:.2f}; other behaviour {r['other_before_rate']:.2f} -> {r['other_after_rate']:.2f}"
    )
    lp = q["loops"]
    print(
        f"loops on {lp['prompts']} unrelated prompts: base {lp['base_unrelated_loops']}, "
        + ", ".join(
            f"after {n} ACCEPT {lp[f'after_{n}']['unrelated_loops']} (taught {lp[f'after_{n}']['taught_answer']!r})"
            for n in (1, 2, 4)
        )
    )
    print(f"cross-user leaks {q['cross_user_leaks']}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer test prompts, shorter freshness run, 1 repeat")
    ap.add_argument("--only", choices=("kinds", "training", "freshness"), help="run this part alone")
    ap.add_argument("--users-per-kind", type=int, help="users of each kind in the quality part (2 quick, else 4)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the quality part's prompts and answers")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if args.only in (None, "kinds"):
            users = args.users_per_kind or (2 if args.quick else 4)
            result["kinds"] = q = kinds(tmp / "q", users_per_kind=users, tests=20, seed=args.seed)
            print_kinds(q)
        if args.only in (None, "training"):
            result["training"] = t = training(tmp / "t", users=64, events=2, steps=4, repeats=1 if args.quick else 3)
            print(f"training: {t['batched_users_per_s']:.1f} vs {t['sequential_peft_users_per_s']:.1f} users/s")
        if args.only in (None, "freshness"):
            result["freshness_ms"] = freshness(tmp / "f", seconds=20 if args.quick else 60, rate=2.0, users=50)
    print(f"\n{'figure':40s} {'value':>12s}")
    for name in (
        "kinds.cross_user_leaks",
        "training.batched_users_per_s",
        "training.sequential_peft_users_per_s",
        "training.speedup",
        "freshness_ms.p50",
        "freshness_ms.p99",
    ):
        part, key = name.split(".")
        if part in result:
            print(f"{name:40s} {result[part][key]:12.3f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
