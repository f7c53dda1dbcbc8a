"""Instruction tuning: a decoder trained to answer prompts, the loss on the response only.

The model, loss and generation are the causal LM's (lmflax.tasks.lm.CausalLM); what differs
is the rows (lmflax.data.instruct: one (prompt, response) example per row, formatted with the
tokenizer's chat template or the plain format, the prompt's tokens weighted 0) and that
generation starts from the formatted prompt. Works with LoRA (model.lora) like any task.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lmflax import decode
from lmflax.data import instruct
from lmflax.data.seq2seq import load_pair_tokenizer
from lmflax.data.tokenizers import Tokenizer
from lmflax.tasks.lm import CausalLM


class InstructionTuning(CausalLM):
    """Supervised fine-tuning on (task.source_key prompt, task.target_key response) records."""

    name = "instruct"
    make_batches = staticmethod(instruct.instruct_dataset)

    @property
    def tokenizer(self) -> Tokenizer:
        """data.tokenizer; 'bpe' / 'wordpiece' are trained on both the prompts and responses."""
        if self._tokenizer is None:
            self._tokenizer = load_pair_tokenizer(self.cfg)
        return self._tokenizer

    def prompt_ids(self, prompt: str) -> list[int]:
        """The formatted prompt (template's user turn + generation prompt, or the plain one)."""
        tok, task = self.tokenizer, self.cfg.task
        template = instruct.template_for(tok, task.chat_template)
        return instruct.prompt_ids(tok, prompt, template, task.system_prompt)

    def sample(self, params: Any, rng: jax.Array) -> str | None:
        """The model's answer to train.sample_prompt, up to its first EOS."""
        t = self.cfg.train
        if t.sample_tokens == 0:
            return None
        tok = self.tokenizer
        prompt = self.prompt_ids(t.sample_prompt)
        out = decode.generate(
            self.model,
            params,
            jnp.asarray([prompt], jnp.int32),
            max_new_tokens=t.sample_tokens,
            rng=rng,
            temperature=t.sample_temperature,
            top_k=40,
        )
        answer = decode.until_eos(np.asarray(out[0, len(prompt) :]), tok.eos_id)
        return f"{t.sample_prompt} -> {tok.decode(answer)}"
