"""Real clients beyond the openai package: lm-eval's local-completions and langchain's OpenAI LLM."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.conftest import FIXTURES, LLAMA

TASK_DATA = FIXTURES / "lm_eval_task" / "hotswap_tiny.jsonl"


def _task_dir(tmp_path: Path) -> Path:
    """A tiny multiple-choice task over a local jsonl file: no hub access."""
    task = {"task": "hotswap_tiny", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(TASK_DATA)}},
            "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "{{question}}",
            "doc_to_choice": "{{choices}}", "doc_to_target": "{{answer}}", "metric_list": [{"metric": "acc"}]}
    (tmp_path / "hotswap_tiny.yaml").write_text(yaml.safe_dump(task))
    return tmp_path


def _loglikelihoods(url: str, tasks: Path, tokenized: bool) -> list[float]:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    args = {"model": "tiny-llama", "base_url": f"{url}/v1/completions", "tokenizer_backend": "huggingface",
            "tokenizer": str(LLAMA), "tokenized_requests": tokenized, "batch_size": 4, "max_retries": 1}
    out = simple_evaluate(model="local-completions", model_args=args, tasks=["hotswap_tiny"],
                          task_manager=TaskManager(include_path=str(tasks), include_defaults=False), log_samples=True)
    samples = out["samples"]["hotswap_tiny"]
    return [ll for s in samples for ll, _ in s["filtered_resps"]]


def test_lm_eval_tokenized_requests_give_the_same_loglikelihoods(llama_server, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    tasks = _task_dir(tmp_path)
    with_ids = _loglikelihoods(llama_server.url, tasks, tokenized=True)
    with_text = _loglikelihoods(llama_server.url, tasks, tokenized=False)
    assert len(with_ids) == 12 and all(ll < 0 for ll in with_ids)
    assert with_ids == pytest.approx(with_text, abs=1e-4)


def test_langchain_openai_invoke(llama_server):
    from langchain_openai import OpenAI

    llm = OpenAI(model="tiny-llama", base_url=f"{llama_server.url}/v1", api_key="unused", max_tokens=6,
                 temperature=0, max_retries=0, model_kwargs={"extra_body": {"ignore_eos": True}})
    native = llama_server.generate(prompt="def add(a, b):", max_new_tokens=6, ignore_eos=True)
    assert llm.invoke("def add(a, b):") == native["text"]
