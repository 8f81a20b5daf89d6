"""Builds the tests' "talking" tiny model: tiny_model_dir supervised for 60 steps on compact-prompt replies that
either quit or bid $1.00. Sampled at temperature 1 it quits (reward 0), bids (0 after max_rounds) or breaks the
protocol (-1), so GRPO groups have non-zero advantages.

Run as its own process (python tests/talking_model.py TINY_DIR OUT_DIR) so that nothing an earlier test did to
the pytest process (vLLM, imported in-process by other tests, changes global torch state) can change its weights,
and with them the golden numbers of tests/test_train.py."""

import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
import env  # noqa: E402


def build(tiny_dir: str, out: str, style: str = "compact", steps: int = 60) -> None:
    """tiny_dir supervised on `style` openings (env.buyer_opening) -> out. rehearsal.py uses it with "full"
    for its tiny Qwen3-MoE."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    fmt = env.ChatFormat(tok)
    seqs = []
    for s in data.load_scenarios()[:40]:  # (the first 40 in file order, train and test alike)
        prompt = fmt.opening(env.buyer_opening(s, style))
        for reply in ("Thought: no\nTalk: no\nAction: [QUIT]",
                      f"Thought: ok\nTalk: ok\nAction: [BUY] $1.00 (1x {s.codename})"):
            seqs.append((prompt + fmt.encode(reply) + [fmt.eos_id], len(prompt)))
    rng = random.Random(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        batch = rng.sample(seqs, 16)
        width = max(len(ids) for ids, _ in batch)
        ids = torch.full((16, width), tok.pad_token_id)
        labels = torch.full((16, width), -100)
        for i, (seq, n_prompt) in enumerate(batch):
            ids[i, :len(seq)] = torch.tensor(seq)
            labels[i, n_prompt:len(seq)] = torch.tensor(seq[n_prompt:])
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(out)
    tok.save_pretrained(out)


if __name__ == "__main__":
    build(sys.argv[1], sys.argv[2])
