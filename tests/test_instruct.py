"""Instruction tuning (task 'instruct', lmflax.data.chat / instruct, finetune/llama_instruct):
chat templates render as transformers renders them, the ids are transformers' ids, only the
response is trained on, and the loss is transformers' loss with the prompt labelled -100."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np
import pytest
import tokenizers
from tokenizers import models, pre_tokenizers, trainers

from lmflax.config import ConfigError, load_config_file, override
from lmflax.data import chat, instruct
from lmflax.data.hf_tokenizer import HFTokenizer
from lmflax.data.sources import DataError
from lmflax.models.config import LoraConfig
from tests.conftest import run_train

# Templates in the shapes the common chat models use (written here, not copied from a model).
HEADERS = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>"
    "\n\n{{ m['content'] | trim }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
# ChatML with a default system turn, block tags on their own lines (trim_blocks / lstrip_blocks
# decide the newlines) and a raise_exception for a conversation that does not alternate.
CHATML = """{% if messages[0]['role'] != 'system' %}
<|im_start|>system
You are a helpful assistant.<|im_end|>
{% endif %}
{% for m in messages %}
    {% if m['role'] == 'assistant' and loop.previtem is defined and loop.previtem['role'] == 'assistant' %}
        {{ raise_exception('roles must alternate') }}
    {% endif %}
<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}"""
SPECIALS = [
    "<s>",
    "</s>",
    "<pad>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|im_start|>",
    "<|im_end|>",
]
TEXT = [
    "Return the sum of a sequence of numbers.",
    "What does the function `math.fsum` do?",
    "Split the string at the separator and return a list of the words.",
    "You are a helpful assistant. Answer briefly.",
] * 20
PAIRS = [
    ("What does the function `math.fsum` do?", "Return an accurate sum of values."),
    ("Explain `str.split`.", "  Return a list of the words in the string.  "),
    ("Hi", "Hello! How can I help?"),
]


def _tokenizer_dir(path: Path, template: str, *, in_config: bool = False) -> Path:
    """A small byte-level BPE saved by transformers, with `template` as its chat template
    (chat_template.jinja as transformers 5 writes it, or inside tokenizer_config.json)."""
    from transformers import PreTrainedTokenizerFast

    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = tokenizers.decoders.ByteLevel()
    backend.train_from_iterator(
        TEXT,
        trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=SPECIALS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    tok.chat_template = template
    tok.save_pretrained(str(path))
    if in_config:
        (path / chat.TEMPLATE_FILE).unlink(missing_ok=True)
        cfg = json.loads((path / "tokenizer_config.json").read_text())
        cfg["chat_template"] = template
        (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    return path


def _hf_ids(tok, messages, **kw) -> list[int]:
    out = tok.apply_chat_template(messages, tokenize=True, **kw)
    return list(out["input_ids"] if not isinstance(out, list) else out)


@pytest.mark.parametrize(
    ("template", "in_config"), [(HEADERS, False), (CHATML, False), (CHATML, True)]
)
def test_chat_template_text_and_ids_equal_transformers(tmp_path, template, in_config):
    from transformers import AutoTokenizer

    directory = _tokenizer_dir(tmp_path / "tok", template, in_config=in_config)
    ref = AutoTokenizer.from_pretrained(str(directory))
    ours = HFTokenizer.from_pretrained(directory).to_lmflax()
    assert ours.chat_template == template
    specials = dict(ours.special_tokens)
    for prompt, response in PAIRS:
        user = [{"role": "user", "content": prompt}]
        both = [*user, {"role": "assistant", "content": response}]
        head, completion, add_eos = chat.prompt_and_completion(
            template, prompt, response, special_tokens=specials
        )
        assert not add_eos
        assert head == ref.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        assert head + completion == ref.apply_chat_template(both, tokenize=False)
        row = instruct.encode_example(ours, prompt, response, 128, template)
        n = int(row["segment_ids"].sum())
        ids = [*row["inputs"][:n].tolist(), int(row["targets"][n - 1])]
        assert ids == _hf_ids(ref, both)
        # The trained targets are exactly the completion's tokens, in order.
        prompt_len = len(_hf_ids(ref, user, add_generation_prompt=True))
        trained = row["targets"][row["weights"] > 0].tolist()
        assert trained == ids[prompt_len:]
        assert instruct.prompt_ids(ours, prompt, template) == ids[:prompt_len]


def test_template_errors_are_reported_with_the_record(tmp_path):
    with pytest.raises(chat.ChatTemplateError, match="roles must alternate"):
        chat.render(
            CHATML,
            [{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}],
            add_generation_prompt=False,
            special_tokens={},
        )
    # A generation prompt that the conversation does not start with: no prompt/response split.
    odd = (
        "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    )
    with pytest.raises(chat.ChatTemplateError, match=r"task\.chat_template='plain'"):
        chat.prompt_and_completion(odd, "q", "a", special_tokens={})
    with pytest.raises(chat.ChatTemplateError, match="not valid Jinja"):
        chat.render("{% for %}", [], add_generation_prompt=True, special_tokens={})
    with pytest.raises(chat.ChatTemplateError, match="none named 'default'"):
        chat.read_chat_template(tmp_path, {"chat_template": [{"name": "tool_use", "template": ""}]})


def test_plain_format_weights_only_the_response_and_eos(tmp_path):
    directory = _tokenizer_dir(tmp_path / "tok", HEADERS)
    tok = HFTokenizer.from_pretrained(directory).to_lmflax()
    prompt, response = PAIRS[0]
    row = instruct.encode_example(tok, prompt, response, 64, None)
    n = int(row["segment_ids"].sum())
    expected_prompt = [tok.bos_id, *tok.encode(chat.PLAIN_PROMPT.format(prompt=prompt))]
    expected = [*expected_prompt, *tok.encode(response), tok.eos_id]
    assert [*row["inputs"][:n].tolist(), int(row["targets"][n - 1])] == expected
    assert row["weights"].tolist() == [0.0] * (len(expected_prompt) - 1) + [1.0] * (
        len(expected) - len(expected_prompt)
    ) + [0.0] * (64 - n)
    assert row["positions"][:n].tolist() == list(range(n))
    # A prompt that fills the row leaves nothing to train on (weight 0), not a wrong target.
    short = instruct.encode_example(tok, prompt, response, 8, None)
    assert short["weights"].sum() == 0 and short["segment_ids"].sum() == 8


def _instruct_config(tokenizer: str, **changes):
    cfg, _ = load_config_file("finetune/llama_instruct:tiny")
    cfg = override(cfg, {"data.tokenizer": tokenizer, **changes})
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, lora=LoraConfig()))


def test_loss_equals_transformers_with_the_prompt_labelled_ignored(tmp_path):
    """The task's loss on a batch of templated examples = LlamaForCausalLM's loss with
    labels = ids, the prompt and the padding set to -100 (both average over the response
    tokens of the whole batch)."""
    import torch
    from transformers import LlamaForCausalLM

    import lmflax
    from lmflax.tasks import make_task
    from lmflax.train import resolve

    directory = _tokenizer_dir(tmp_path / "tok", CHATML)
    cfg = resolve(_instruct_config(f"hf:{directory}", **{"task.chat_template": "tokenizer"}))
    task = make_task(cfg)
    _, params = lmflax.from_pretrained(cfg.model.init_from.removeprefix("hf:"))
    rows = [
        instruct.encode_example(task.tokenizer, p, r, 48, task.tokenizer.chat_template)
        for p, r in PAIRS
    ]
    batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    loss_sum, metrics = jax.jit(task.loss, static_argnums=3)(params, batch, jax.random.key(0), True)
    ours = float(loss_sum / metrics["loss"][1])

    ids = np.concatenate([batch["inputs"], batch["targets"][:, -1:]], axis=1)
    real = np.concatenate([batch["segment_ids"], np.zeros((len(rows), 1), np.int32)], axis=1)
    n = batch["segment_ids"].sum(1)
    real[np.arange(len(rows)), n] = 1  # the last target is a real token too
    labels = np.where(real > 0, ids, -100)
    labels[:, 1:][batch["weights"] == 0] = -100  # prompt (and padding) targets
    labels[:, 0] = -100
    ref = LlamaForCausalLM.from_pretrained(cfg.model.init_from.removeprefix("hf:")).eval()
    with torch.no_grad():
        theirs = ref(
            input_ids=torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(real),
            labels=torch.tensor(labels, dtype=torch.long),
        ).loss.item()
    assert abs(ours - theirs) < 1e-5, (ours, theirs)
    assert float(metrics["loss"][1]) == float((labels[:, 1:] != -100).sum())


def test_bad_settings_are_config_errors(tmp_path):
    from lmflax.tasks import make_task
    from lmflax.train import resolve

    with pytest.raises(ConfigError, match=r"task\.chat_template must be one of auto, tokenizer"):
        resolve(_instruct_config("bpe", **{"task.chat_template": "llama"}))
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text(
        "".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in PAIRS * 30)
    )
    directory = _tokenizer_dir(tmp_path / "tok", HEADERS)
    (directory / chat.TEMPLATE_FILE).unlink()  # a tokenizer without a template
    cfg = resolve(
        _instruct_config(
            f"hf:{directory}",
            **{"task.chat_template": "tokenizer", "data.dataset": f"jsonl:{jsonl}"},
        )
    )
    with pytest.raises(ConfigError, match="has no chat template"):
        make_task(cfg).dataset("train", seed=0, batch_size=2)
    # A record without the prompt field names the record and the setting.
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "response": "r"}) + "\n")
    cfg = resolve(_instruct_config("bpe", **{"data.dataset": f"jsonl:{bad}"}))
    with pytest.raises(
        DataError, match=r"bad.jsonl:1: no value for column 'prompt' \(task.source_key\)"
    ):
        make_task(cfg).dataset("train", seed=0, batch_size=1)


@pytest.mark.slow
def test_llama_instruct_tiny_trains_adapters_with_a_chat_template(tmp_path, data_dir):
    """`finetune/llama_instruct:tiny` with a chat-template tokenizer trains, evaluates, writes
    a checkpoint of adapters and answers the sample prompt."""
    directory = _tokenizer_dir(tmp_path / "tok", HEADERS)
    work = tmp_path / "run"
    proc = run_train(
        [
            "--config=lmflax/configs/finetune/llama_instruct.py:tiny",
            f"--workdir={work}",
            f"--config.data.tokenizer=hf:{directory}",
            "--config.task.chat_template=tokenizer",
            "--config.train.steps=6",
            "--config.train.checkpoint_every=3",
            "--config.train.log_every=3",
            "--config.train.eval_steps=1",
        ],
        data_dir,
    )
    rows = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r and r.get("step") in (3, 6)]
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert "What does the function `json.dumps` do? ->" in proc.stdout
    assert "trained (LoRA adapters)" in proc.stderr + proc.stdout
