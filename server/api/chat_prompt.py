"""The prompt a chat request becomes: the tokenizer's chat template, else plain turns.

Without a template, turns are `<role>: <content>` lines (`<role> <name>:` with a `name`) and the
generation prompt is `assistant:`;
the model then tends to answer with a space or newline first, which the chat endpoint drops.
"""
from __future__ import annotations

from jinja2 import TemplateError

from server.api.schemas import ChatMessage
from server.errors import InvalidRequestError


def chat_prompt_ids(tokenizer, messages: list[ChatMessage], add_generation_prompt: bool = True) -> tuple[list[int], bool]:
    """The prompt's token ids, and whether the tokenizer's chat template made them."""
    turns = [m.turn() for m in messages]
    if tokenizer.chat_template:
        try:
            ids = tokenizer.apply_chat_template(turns, add_generation_prompt=add_generation_prompt, tokenize=True,
                                                return_dict=False)
        except TemplateError as exc:  # the template's own check (e.g. roles must alternate): the request's fault
            raise InvalidRequestError(f"messages: expected turns the model's chat template accepts, got: {exc}") from exc
        return list(ids), True
    speakers = [f"{t['role']} {t['name']}" if "name" in t else t["role"] for t in turns]
    text = "".join(f"{who}: {t['content']}\n" for who, t in zip(speakers, turns))
    text += "assistant:" if add_generation_prompt else ""
    return tokenizer.encode(text, add_special_tokens=False), False
