"""Evaluation shared over 2 real gloo ranks gives every rank the one-process metrics (labelled, causal LM, and
generation), with uneven shares and stand-in batches."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import torch
import torch.multiprocessing as mp
import transformers

from unipeft.data import TaskSpec
from unipeft.models import load_model
from unipeft.train.distributed import DDPStrategy, Strategy
from unipeft.train.evaluate import evaluate, shard_batches
from unipeft.train.generation import evaluate_generation

from tests.conftest import tiny_config
from tests.train.test_evaluate import CLS, LM, examples

PROMPTS = [{"mr": f"name[{c}] food[{f}]", "text": f"{c} serves {f}."} for c in "ABCDE" for f in ("tea", "soup")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def everything(ranks: Strategy, folder: str) -> dict:
    """The three evaluations on fixed tiny models, over ``ranks``."""
    torch.manual_seed(0)
    bert = transformers.BertForSequenceClassification(tiny_config("bert")).eval()
    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(tiny_config("llama")).eval()
    model, tokenizer = load_model(folder, kind="causal_lm")
    task = TaskSpec(name="toy_gen", kind="generation", train_path="a", eval_path="b",
                    prompt_template="mr: {mr}\ntext:\n", response_field="text", metrics=("bleu", "rouge_l"),
                    main_metric="bleu", max_new_tokens=5)
    scores, generations = evaluate_generation(model, tokenizer, task, PROMPTS, batch_size=3, ranks=ranks)
    return {"cls": evaluate(bert, CLS, examples(13, seed=0), batch_size=4, ranks=ranks),
            "lm": evaluate(llama, LM, examples(11, seed=1, lm=True), batch_size=3, ranks=ranks),
            "gen": scores, "outputs": [g["output"] for g in generations]}


def _rank(rank: int, world: int, port: int, folder: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    ranks = DDPStrategy()
    try:
        result = everything(ranks, folder)
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        ranks.close()


def test_shard_batches_give_every_rank_the_same_number_of_forwards():
    class Two(Strategy):
        world_size = 2

        def __init__(self, rank):
            self.rank = rank

    order = list(range(7))
    zero, one = shard_batches(order, 2, Two(0)), shard_batches(order, 2, Two(1))
    assert zero == [([0, 2], True), ([4, 6], True)]
    assert one == [([1, 3], True), ([5], True)]
    assert len(shard_batches(list(range(5)), 2, Two(1))) == 2  # [1, 3], then a stand-in
    assert shard_batches(list(range(5)), 2, Two(1))[1] == ([0], False)
    assert shard_batches(order, 3, Strategy()) == [([0, 1, 2], True), ([3, 4, 5], True), ([6], True)]


def test_two_ranks_get_the_one_process_metrics(tmp_path, tiny_llama_folder):
    torch.set_num_threads(1)
    one = everything(Strategy(), tiny_llama_folder)
    mp.spawn(_rank, args=(2, free_port(), tiny_llama_folder, str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        two = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert two["outputs"] == one["outputs"]
        assert two["gen"] == one["gen"]
        assert two["cls"]["accuracy"] == one["cls"]["accuracy"]
        for key in ("cls", "lm"):
            for metric, value in one[key].items():
                assert abs(two[key][metric] - value) <= 1e-5 * max(1.0, abs(value)), (key, metric)
