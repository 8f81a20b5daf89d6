"""Self-play's league: who each group of episodes plays against, and the snapshots of both sides.

With selfplay.mode != off the seller is a second LoRA adapter ("seller") on the buyer's base model and learns by
GRPO too (train.py). A side that only ever meets the other side's latest self can chase it round in circles, so
each group of G episodes (one product) draws its opponent from a pool, with the config's weights:

    latest     the other side's adapter as it is now (in simultaneous mode such a group trains both sides)
    snapshots  one of the other side's saved snapshots, uniformly (the latest while there is none yet)
    base       the frozen base model, adapter off (it plays both roles: the warm start was supervised on both)
    scripted   the seller family the warm start imitates / the ladder teachers (OG-Narrator outside the ladder)

A group's pairing names, per role, "learner" (the side being trained this step), "base", "scripted" or a
snapshot's adapter name ("seller@20"); a side trains on exactly the groups where its role is "learner".
Snapshots are saved as standard peft folders in out_dir/snapshots/ (a resumed run reloads them) and served like
the two sides: by the HF engine as extra (frozen) peft adapters of the model, by vLLM as LoRA slots.
"""
from __future__ import annotations

import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

ROLES = ("buyer", "seller")
ADAPTERS = {"buyer": "default", "seller": "seller"}   # peft adapter names: the buyer's is every checkpoint's
OTHER = {"buyer": "seller", "seller": "buyer"}


def learning_roles(mode: str, step: int, switch_every: int) -> list[str]:
    """The roles that learn at `step` (0-based): the buyer alone when self-play is off; in alternate mode
    switch_every steps of the buyer, then as many of the seller; in simultaneous mode both."""
    if mode == "off":
        return ["buyer"]
    if mode == "simultaneous":
        return list(ROLES)
    return ["buyer"] if (step // switch_every) % 2 == 0 else ["seller"]


def league_weights(sp) -> dict[str, float]:
    return {"latest": sp.league_latest, "snapshots": sp.league_snapshots, "base": sp.league_base,
            "scripted": sp.league_scripted}


def draw_pairings(roles: list[str], n_groups: int, weights: dict[str, float], snapshots: dict[str, list[str]],
                  seed) -> list[dict[str, str]]:
    """One pairing {"buyer": key, "seller": key} per group. Group k belongs to roles[k % len(roles)] (its
    "learner"); its opponent is drawn by `weights`: "latest" makes the other role "learner" too when that role
    also learns this step, its current adapter otherwise; "snapshots" one of snapshots[other] (latest if none)."""
    rng = random.Random(f"league:{seed}")
    kinds = [k for k, w in weights.items() if w > 0]
    pairings = []
    for k in range(n_groups):
        owner = roles[k % len(roles)]
        other = OTHER[owner]
        kind = rng.choices(kinds, [weights[x] for x in kinds])[0]
        if kind == "snapshots":
            kind = rng.choice(snapshots[other]) if snapshots[other] else "latest"
        if kind == "latest":
            kind = "learner" if other in roles else "current"
        pairings.append({owner: "learner", other: kind})
    return pairings


def trained_rows(pairings: list[dict[str, str]], role: str, group_size: int) -> list[int]:
    """The episodes (indices into the step's games) that train `role`: those of the groups it plays as learner."""
    return [k * group_size + j for k, p in enumerate(pairings) if p[role] == "learner" for j in range(group_size)]


@dataclass
class Snapshot:
    role: str
    step: int
    adapter: str   # its peft adapter name in the model, e.g. "seller@20"


class Snapshots:
    """Each side's last `keep` snapshots, saved under out_dir/snapshots/ as peft folders and served as opponents:
    by the HF engine as extra peft adapters of the model (engine=None), by a vLLM engine as LoRA slots read
    from those folders (the trainer's model, perhaps sharded by FSDP2, never holds them)."""

    def __init__(self, model, out_dir: str, keep: int, engine=None):
        self.model, self.dir, self.keep, self.engine = model, Path(out_dir) / "snapshots", keep, engine
        self.taken: dict[str, list[Snapshot]] = {r: [] for r in ROLES}

    def names(self) -> dict[str, list[str]]:
        return {r: [s.adapter for s in self.taken[r]] for r in ROLES}

    def folder(self, role: str, step: int) -> Path:
        return self.dir / f"{role}_step_{step:06d}"

    def take(self, role: str, step: int, write: bool = True) -> Snapshot:
        """The side's adapter as it is now, as opponent "<role>@<step>": written to disk by the rank with `write`
        (a collective under FSDP2: every rank gathers), then served. The oldest beyond `keep` is dropped."""
        import torch.distributed as dist
        from safetensors.torch import save_file
        from vllm_engine import adapter_state_dict

        name, folder = f"{role}@{step}", self.folder(role, step)
        weights = adapter_state_dict(self.model, adapter=ADAPTERS[role])   # full tensors on every rank
        if write:
            tmp = folder.with_name(folder.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            save_file(weights, tmp / "adapter_model.safetensors")
            self.model.peft_config[ADAPTERS[role]].save_pretrained(str(tmp))
            shutil.rmtree(folder, ignore_errors=True)
            tmp.rename(folder)
        if dist.is_initialized():
            dist.barrier()   # the folder exists before any rank's engine reads it
        self.serve(role, step, name, weights)
        while len(self.taken[role]) > self.keep:
            old = self.taken[role].pop(0)
            if self.engine is None:
                self.model.delete_adapter(old.adapter)
            else:
                self.engine.drop_adapter(old.adapter)
            if write:
                shutil.rmtree(self.folder(role, old.step), ignore_errors=True)
        return self.taken[role][-1]

    def serve(self, role: str, step: int, name: str, weights: dict) -> None:
        if self.engine is None:   # the HF engine: a peft adapter of the model
            add_frozen_adapter(self.model, ADAPTERS[role], name)
            set_adapter_weights(self.model, name, weights)
        else:
            self.engine.use_adapter(str(self.folder(role, step)), name)
        self.taken[role].append(Snapshot(role, step, name))

    def restore(self, up_to_step: int) -> None:
        """A resumed run: the snapshots saved at or before its checkpoint, back as adapters (newer ones, written
        after the checkpoint by the killed run, are removed)."""
        from peft.utils import load_peft_weights
        for folder in sorted(self.dir.glob("*_step_*")) if self.dir.exists() else []:
            role, step = folder.name.split("_step_")[0], int(folder.name.split("_step_")[1].split(".")[0])
            if folder.name.endswith(".tmp") or step > up_to_step:
                shutil.rmtree(folder, ignore_errors=True)
                continue
            self.serve(role, step, f"{role}@{step}", load_peft_weights(str(folder), device="cpu"))


def add_seller_adapter(model, seed: int) -> None:
    """The seller's own LoRA, configured like the buyer's: B = 0 at the start, so it begins as the frozen base.
    Seeded on its own, so the buyer's initialisation is the same as in a single-sided run."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed + 7919)
    model.add_adapter(ADAPTERS["seller"], model.peft_config[ADAPTERS["buyer"]])
    torch.random.set_rng_state(state)
    model.set_adapter(ADAPTERS["buyer"])   # the active adapter stays the buyer's (train.py's default everywhere)


def add_frozen_adapter(model, like: str, name: str) -> None:
    """A new peft adapter `name` configured like adapter `like`, frozen (snapshots are opponents, never trained);
    set_adapter_weights gives it its values."""
    if name not in model.peft_config:
        model.add_adapter(name, model.peft_config[like])
        model.set_adapter(ADAPTERS["buyer"])
    for n, p in model.named_parameters():
        if f".{name}." in n:
            p.requires_grad_(False)


def set_adapter_weights(model, name: str, saved: dict[str, torch.Tensor]) -> None:
    """peft checkpoint names (no adapter name: "...lora_A.weight") into adapter `name`'s parameters."""
    params = {n.replace(f".{name}.", "."): p for n, p in model.named_parameters() if f".{name}." in n}
    missing = sorted(set(saved) ^ set(params))[:3]
    if missing:
        raise SystemExit(f"a saved adapter does not fit adapter {name!r} of this model (e.g. {missing})")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(saved[k].to(p.device, p.dtype))


def adapter_params(model, name: str) -> list[torch.nn.Parameter]:
    return [p for n, p in model.named_parameters() if f".{name}." in n and "lora_" in n]
