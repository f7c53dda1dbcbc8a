"""Prompt formats for instruction tuning: a tokenizer's chat template, or a plain one.

A Hugging Face model directory may carry a Jinja chat template (`chat_template.jinja`, or
`chat_template` in tokenizer_config.json, a string or a list of named templates of which
'default' is used). It is rendered as `transformers`' `apply_chat_template(..., tokenize=False)`
renders it: a sandboxed Jinja environment with `trim_blocks` and `lstrip_blocks`, the
`loopcontrols` extension, `raise_exception`, `strftime_now`, a `tojson` that does not escape
HTML, and the tokenizer's special tokens (`bos_token`, `eos_token`, ...) as variables.

An example (prompt, response) becomes two texts: the *prompt part*, which the model reads but is
not trained to produce (the template's rendering of the user turn with the generation prompt),
and the *completion*, which carries the loss (the rest of the conversation's rendering: the
response and the template's end-of-turn marks). Without a template, the plain format is

  ### Instruction:\\n{prompt}\\n\\n### Response:\\n   then   {response} + EOS token
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

PLAIN_PROMPT = "### Instruction:\n{prompt}\n\n### Response:\n"
TEMPLATE_FILE = "chat_template.jinja"


class ChatTemplateError(ValueError):
    """A chat template that cannot be read or rendered, or renders an unusable conversation."""


def read_chat_template(directory: str | Path, tokenizer_config: Mapping[str, Any]) -> str | None:
    """The chat template of a HF model directory (None if it has none): `chat_template.jinja`
    first (what transformers 5 writes), else tokenizer_config.json's `chat_template` (a string,
    or a list of {'name', 'template'} of which 'default' is taken)."""
    path = Path(directory) / TEMPLATE_FILE
    if path.is_file():
        try:
            return path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ChatTemplateError(f"{path} is not UTF-8 text: {e}") from None
    value = tokenizer_config.get("chat_template")
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
        raise ChatTemplateError(
            f"{Path(directory) / 'tokenizer_config.json'} has several chat templates "
            f"({', '.join(sorted(map(str, named)))}) and none named 'default'"
        )
    raise ChatTemplateError(
        f"chat_template in {Path(directory) / 'tokenizer_config.json'} must be a string or a "
        f"list of named templates, got {type(value).__name__}"
    )


@lru_cache(maxsize=8)
def _compile(template: str) -> Any:
    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(
        x: Any,
        ensure_ascii: bool = False,
        indent: int | None = None,
        separators: Any = None,
        sort_keys: bool = False,
    ) -> str:
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatTemplateError(
            f"the chat template is not valid Jinja (line {e.lineno}): {e}"
        ) from None


def render(
    template: str,
    messages: list[dict[str, str]],
    *,
    add_generation_prompt: bool,
    special_tokens: Mapping[str, str],
) -> str:
    """The template's text for `messages` ([{'role': 'user', 'content': ...}, ...])."""
    try:
        return _compile(template).render(
            messages=messages,
            tools=None,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **special_tokens,
        )
    except jinja2.exceptions.TemplateError as e:
        raise ChatTemplateError(f"the chat template failed on {messages!r}: {e}") from None


def prompt_and_completion(
    template: str | None,
    prompt: str,
    response: str,
    *,
    special_tokens: Mapping[str, str],
    system: str = "",
) -> tuple[str, str, bool]:
    """(prompt part, completion, whether the completion's end-of-sequence token must be
    appended) of one example.

    With a template: the prompt part is the rendering of [system?, user] with the generation
    prompt, the completion what the rendering of [system?, user, assistant] adds to it (the
    template writes its own end-of-turn marks, so no EOS is appended). Without one, the plain
    format of the module docstring (EOS appended).
    """
    if template is None:
        head = f"{system}\n\n" if system else ""
        return head + PLAIN_PROMPT.format(prompt=prompt), response, True
    turns = [{"role": "system", "content": system}] if system else []
    turns.append({"role": "user", "content": prompt})
    head = render(template, turns, add_generation_prompt=True, special_tokens=special_tokens)
    full = render(
        template,
        [*turns, {"role": "assistant", "content": response}],
        add_generation_prompt=False,
        special_tokens=special_tokens,
    )
    if not full.startswith(head):
        raise ChatTemplateError(
            "the chat template does not render the conversation with the prompt turn as a "
            f"prefix, so the response cannot be told apart from the prompt: the prompt renders "
            f"as {head[-80:]!r}, the conversation as {full[: len(head) + 40][-120:]!r}; use "
            "task.chat_template='plain'"
        )
    return head, full[len(head) :], False
