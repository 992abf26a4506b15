"""Train the bundled tiny-llada: a small LLaDA-architecture model, SFT'd on tiny_gsm with LLaDA's objective.

LLaDA (Nie et al., "Large Language Diffusion Models", arXiv:2502.09992, Sec. 2.3 and Appendix B.1; the SFT
loss of ML-GSAI/LLaDA GUIDELINES.md):

- every example is ``prompt + response``: the prompt is the user turn in LLaDA's chat template plus the
  assistant header; the response is the answer, ``<|eot_id|>``, then ``<|endoftext|>`` padding to the
  sequence length (the model learns to end answers by filling the tail with EOS);
- one masking ratio per sequence, t ~ U(0, 1] (``p_mask = (1 - eps) t + eps``); each *response* token is
  masked with probability ``p_mask``; the prompt is never masked;
- loss = sum over masked tokens of ``CE / p_mask``, each sequence normalised by its response length
  (EOS padding included), averaged over the batch: an upper bound on the response's negative log-likelihood.

The model is our own ``DiffusionLM`` module (what ``load_model`` builds for LLaDA checkpoints); the result
is written in the official layout (config.json, safetensors with LLaDA's weight names, byte-level tokenizer
with LLaDA's special tokens and chat template) by ``lmeval_dllm.tiny.write_checkpoint``, with
``train_log.json`` recording every setting, the seed, the loss curve and a final greedy evaluation.

    python scripts/train_tiny_llada.py --out lmeval_dllm/assets/tiny-llada             # GPU: a few minutes
    python scripts/train_tiny_llada.py --out /tmp/dry --device cpu --steps 20 --batch_size 8 --train_size 2000
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tiny_gsm_data next to this file
import tiny_gsm_data  # noqa: E402

from lmeval_dllm.generate import GenerationConfig, generate  # noqa: E402
from lmeval_dllm.models import llada  # noqa: E402
from lmeval_dllm.models import DiffusionLM  # noqa: E402
from lmeval_dllm.samplers.proposal import Proposal  # noqa: E402
from lmeval_dllm.samplers.vanilla import LowConfidenceSampler  # noqa: E402
from lmeval_dllm.tiny import llada_config, official_state_dict, write_checkpoint, write_tokenizer  # noqa: E402


# ---------------------------------------------------------------------------------------------------------------
# Tokens: the byte-level tokenizer of lmeval_dllm.tiny (id = byte value; specials after the 256 bytes)

def chat_prompt_ids(question: str, ids: dict[str, int]) -> list[int]:
    """LLaDA's chat template for one user turn plus the assistant header, as token ids.

    Equals ``tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)``
    (checked in ``main``); building it directly keeps tokenising a million problems fast.
    """
    sh, eh = ids["start_header"], ids["end_header"]
    return ([ids["bos"], sh, *b"user", eh, *b"\n\n", *question.strip().encode(), ids["eot"],
             sh, *b"assistant", eh, *b"\n\n"])


def encode_split(problems: list[dict], ids: dict[str, int], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """-> tokens (N, seq_len) int16 = prompt + answer + EoT + EOS padding, prompt lengths (N,) int32."""
    tokens = np.full((len(problems), seq_len), ids["eos"], dtype=np.int16)
    prompt_len = np.zeros(len(problems), dtype=np.int32)
    for i, p in enumerate(problems):
        prompt = chat_prompt_ids(p["question"], ids)
        row = prompt + list(p["answer"].encode()) + [ids["eot"]]
        assert len(row) <= seq_len, f"example of {len(row)} tokens > seq_len={seq_len}: {p['question']!r}"
        tokens[i, :len(row)] = row
        prompt_len[i] = len(prompt)
    return tokens, prompt_len


# ---------------------------------------------------------------------------------------------------------------
# The LLaDA SFT objective

def sft_loss(model: DiffusionLM, input_ids: torch.Tensor, prompt_len: torch.Tensor, mask_token_id: int,
             generator: torch.Generator, eps: float = 1e-3) -> torch.Tensor:
    """LLaDA's SFT loss (arXiv:2502.09992 Eq. 5; GUIDELINES.md "SFT").

    Args:
        input_ids (`torch.LongTensor` of shape `(B, S)`): prompt + response (+ EOS padding).
        prompt_len (`torch.LongTensor` of shape `(B,)`): prompt tokens per row (never masked).
    Returns:
        scalar: mean over rows of ``sum_masked CE / p_mask`` / response length.
    """
    B, S = input_ids.shape
    device = input_ids.device
    t = torch.rand(B, device=device, generator=generator)
    p_mask = ((1 - eps) * t + eps)[:, None].expand(B, S)  # (B, S)
    col = torch.arange(S, device=device)[None, :]
    response = col >= prompt_len[:, None]  # (B, S)
    masked = (torch.rand(B, S, device=device, generator=generator) < p_mask) & response
    noisy = torch.where(masked, mask_token_id, input_ids)
    position_ids = col.expand(B, S)
    logits = model(noisy, position_ids)  # (B, S, V)
    token_loss = F.cross_entropy(logits[masked].float(), input_ids[masked], reduction="none") / p_mask[masked]
    answer_len = (S - prompt_len)[:, None].expand(B, S)[masked].float()
    return (token_loss / answer_len).sum() / B


def init_weights(model: DiffusionLM, std: float = 0.02) -> None:
    """GPT-2-style init: N(0, std), residual output projections scaled by 1/sqrt(2 n_layers), norms at 1."""
    for name, p in model.named_parameters():
        if p.dim() == 1:
            torch.nn.init.ones_(p)
        elif name.endswith(("wo.weight", "w2.weight")):
            torch.nn.init.normal_(p, std=std / math.sqrt(2 * model.args.n_layers))
        else:
            torch.nn.init.normal_(p, std=std)


# ---------------------------------------------------------------------------------------------------------------
# Greedy evaluation with the package's own decode loop (what lm_eval runs)

ANSWER_RE = re.compile(r"#### (\-?[0-9\.\,]+)")  # lm-eval gsm8k "strict-match"


@torch.no_grad()
def evaluate(model: DiffusionLM, problems: list[dict], ids: dict[str, int], *, gen_length: int, block_length: int,
             batch_size: int, **sampler_kw) -> dict:
    """Exact match of the strict ``#### N`` answer, and mean NFE, under one decoding setting."""
    stop = torch.tensor([ids["eos"], ids["eot"]], device=model.device)
    sampler = LowConfidenceSampler(Proposal(), **sampler_kw)
    config = GenerationConfig(gen_length=gen_length, block_length=block_length)
    correct, nfe = 0, 0
    for i in range(0, len(problems), batch_size):
        chunk = problems[i:i + batch_size]
        prompts = [chat_prompt_ids(p["question"], ids) for p in chunk]
        P = max(map(len, prompts))
        x = torch.tensor([[ids["eos"]] * (P - len(p)) + p for p in prompts])
        mask = torch.tensor([[False] * (P - len(p)) + [True] * len(p) for p in prompts])
        out = generate(model, x, mask, sampler, config, stop_token_ids=stop)
        for row, n, length, p in zip(out.tokens.tolist(), out.nfe.tolist(), out.answer_length.tolist(), chunk):
            text = bytes(t for t in row[:length] if t < 256).decode("utf-8", "replace")
            m = ANSWER_RE.search(text)
            correct += bool(m) and m.group(1) == p["answer"].split("#### ")[-1]
            nfe += n
    return {"accuracy": correct / len(problems), "mean_nfe": nfe / len(problems), "n": len(problems)}


# ---------------------------------------------------------------------------------------------------------------

def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Train tiny-llada on tiny_gsm with the LLaDA SFT objective.")
    ap.add_argument("--out", required=True, help="checkpoint directory to write")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    # model (LLaDA architecture, small)
    ap.add_argument("--d_model", type=int, default=256)
    ap.add_argument("--n_layers", type=int, default=6)
    ap.add_argument("--n_heads", type=int, default=4)
    ap.add_argument("--mlp_hidden_size", type=int, default=512)
    ap.add_argument("--rope_theta", type=float, default=10000.0)
    # data
    ap.add_argument("--train_size", type=int, default=1_000_000, help="distinct training problems")
    ap.add_argument("--seq_len", type=int, default=0, help="0: longest prompt + gen_length")
    ap.add_argument("--gen_length", type=int, default=64,
                    help="tiny_gsm's gen_length: the response region after the longest prompt, and the eval's")
    # optimisation
    ap.add_argument("--steps", type=int, default=6500, help="the shipped run made 6523 (time-bound, 400 s on an H100)")
    ap.add_argument("--time_limit_s", type=float, default=0.0,
                    help="> 0: the LR schedule runs on max(step/steps, elapsed/limit) and training stops at 1")
    ap.add_argument("--batch_size", type=int, default=512)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--min_lr", type=float, default=1e-4)
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--weight_decay", type=float, default=0.1)
    ap.add_argument("--grad_clip", type=float, default=1.0)
    ap.add_argument("--log_every", type=int, default=200)
    ap.add_argument("--save_every_s", type=float, default=120.0)
    ap.add_argument("--eval_every", type=int, default=2000, help="greedy accuracy on 200 test problems (0: off)")
    # final evaluation on the test split
    ap.add_argument("--eval_size", type=int, default=500)
    ap.add_argument("--eval_batch_size", type=int, default=500)
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    os.makedirs(args.out, exist_ok=True)
    t_start = time.time()

    # Tokenizer first: its ids define the vocabulary, and our fast encoder is checked against its template.
    ids = write_tokenizer(args.out, "llada")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.out)
    ids.update(start_header=tok.convert_tokens_to_ids("<|start_header_id|>"),
               end_header=tok.convert_tokens_to_ids("<|end_header_id|>"))
    data = tiny_gsm_data.splits(args.train_size)
    for p in data["test"][:3]:
        text = tok.apply_chat_template([{"role": "user", "content": p["question"]}], tokenize=False,
                                       add_generation_prompt=True)
        assert tok.encode(text, add_special_tokens=False) == chat_prompt_ids(p["question"], ids), text

    prompt_max = max(len(chat_prompt_ids(p["question"], ids)) for p in data["train"])
    seq_len = args.seq_len or prompt_max + args.gen_length
    tokens, prompt_len = encode_split(data["train"], ids, seq_len)
    tokens = torch.from_numpy(tokens).to(device)
    prompt_len = torch.from_numpy(prompt_len).long().to(device)
    print(f"data: {len(data['train'])} train problems, seq_len {seq_len} ({time.time() - t_start:.0f}s)", flush=True)

    config = llada_config(ids, d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads,
                          mlp_hidden_size=args.mlp_hidden_size, rope_theta=args.rope_theta, max_sequence_length=512)
    model = DiffusionLM(llada.parse_config(config)).to(device)
    init_weights(model)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters", flush=True)

    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.98), fused=device.type == "cuda")
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu",
                                                                                                    enabled=False)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    log = {"args": vars(args), "seq_len": seq_len, "n_params": n_params, "torch": torch.__version__,
           "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "loss": []}

    def save(tag: str) -> None:
        weights = official_state_dict(model, dtype=torch.bfloat16)  # bf16 storage: half the bytes
        write_checkpoint(args.out, "llada", weights=weights, shards=1, d_model=args.d_model,
                         n_layers=args.n_layers, n_heads=args.n_heads, mlp_hidden_size=args.mlp_hidden_size,
                         rope_theta=args.rope_theta, max_sequence_length=512)
        with open(os.path.join(args.out, "train_log.json"), "w", encoding="utf-8") as f:
            json.dump({**log, "saved_at": tag}, f, indent=1)

    model.train()
    t_train, last_save, step = time.time(), time.time(), 0
    while True:
        elapsed = time.time() - t_train
        progress = step / args.steps
        if args.time_limit_s > 0:
            progress = max(progress, elapsed / args.time_limit_s)
        if progress >= 1.0:
            break
        lr = args.lr * min(1.0, (step + 1) / args.warmup)
        if step >= args.warmup:  # cosine in the run's progress (0 -> 1) from lr to min_lr; warm-up covers its start
            lr = args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * progress))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(0, tokens.shape[0], (args.batch_size,), device=device, generator=gen)
        with amp:
            loss = sft_loss(model, tokens[idx].long(), prompt_len[idx], ids["mask"], gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        step += 1
        if step % args.log_every == 0:
            entry = {"step": step, "loss": round(loss.item(), 4), "lr": lr, "elapsed_s": round(time.time() - t_train)}
            log["loss"].append(entry)
            print(json.dumps(entry), flush=True)
        if args.eval_every and step % args.eval_every == 0:
            model.eval()
            res = evaluate(model, data["test"][:200], ids, gen_length=args.gen_length, block_length=32,
                           batch_size=200, num_transfer_tokens=1)
            log.setdefault("eval_during_training", []).append({"step": step, **res})
            print(json.dumps({"step": step, "vanilla_b32": res}), flush=True)
            model.train()
        if time.time() - last_save > args.save_every_s:
            save(f"step {step}")
            last_save = time.time()
    log.update(steps_done=step, train_time_s=round(time.time() - t_train, 1))
    print(f"trained {step} steps in {log['train_time_s']}s", flush=True)

    # Evaluate the weights as shipped: bf16-rounded, run in float32.
    save("final")
    model.eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    test = data["test"][:args.eval_size]
    settings = {"vanilla_b32": dict(block_length=32, num_transfer_tokens=1),
                "vanilla_b64": dict(block_length=64, num_transfer_tokens=1),
                "threshold0.9_b32": dict(block_length=32, threshold=0.9),
                "threshold0.5_b32": dict(block_length=32, threshold=0.5),
                "factor1.0_b32": dict(block_length=32, factor=1.0),
                "threshold0.5_b64": dict(block_length=64, threshold=0.5),
                "factor1.0_b64": dict(block_length=64, factor=1.0)}
    log["eval"] = {}
    for name, kw in settings.items():
        t = time.time()
        res = evaluate(model, test, ids, gen_length=args.gen_length, batch_size=args.eval_batch_size, **kw)
        res["time_s"] = round(time.time() - t, 1)
        log["eval"][name] = res
        print(name, json.dumps(res), flush=True)
    log["total_time_s"] = round(time.time() - t_start, 1)
    with open(os.path.join(args.out, "train_log.json"), "w", encoding="utf-8") as f:
        json.dump({**log, "saved_at": "final"}, f, indent=1)


if __name__ == "__main__":
    main()
