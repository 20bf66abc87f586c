"""LoRAX's (and TGI's) generation API, so `lorax-client` works unchanged against hotswap.

- `POST /` (what `lorax.Client(base_url)` posts to): `{"inputs", "parameters", "stream"}`; a JSON
  list of one response, or server-sent events when `stream` is true;
- `POST /generate_stream`: the events; `POST /generate` with a LoRAX body (it has `inputs` and
  neither `prompt` nor `prompt_token_ids`; see `LoraxBodies`) answers one response, while our
  own `/generate` body keeps its contract.

`parameters.adapter_id` is the name of a registered adapter (any kind; `adapter_source` is not
needed: upload or register the adapter first). `parameters.merged_adapters` `{"ids", "weights",
"merge_strategy": "linear"}` runs those adapters combined, as our `adapters` list does: the exact
weighted sum of the LoRAs' deltas (composition.py). LoRAX's own "linear" weights and sums the A and
the B matrices separately instead (an approximation that needs equal ranks); its other strategies
are refused. Sampling follows TGI: greedy unless `do_sample`
or a temperature, top_k or top_p is set; no `max_new_tokens` means up to the end of the context.
A stop sequence ends the generation and stays in `generated_text`, as in LoRAX and TGI (our own
routes cut it). Every event's `token.text` is the text that token added, so the non-special
tokens' texts join to `generated_text`. `parameters.mode` (`merged`/`unmerged`) chooses how a LoRA
runs, as on `/generate`; `adapter_id` naming the base model means no adapter, as in LoRAX.
"""
from __future__ import annotations

import json
import secrets
from dataclasses import replace
from typing import ClassVar

from fastapi import APIRouter, Depends, Request
from pydantic import ConfigDict, Field, field_validator

from server.api.deps import require_api_key
from server.adapters.composition import Part, check_parts
from server.api.generation import Generation, Item, Job, Outcome, Selection
from server.api.models import default_max_tokens
from server.api.openai_schemas import NullIsAbsent
from server.api.schemas import KnownFields, Moded, Stops, encodable
from server.api.sse import EventStream, stream_response
from server.engine.sampling import SamplingParams
from server.errors import InvalidRequestError

router = APIRouter(dependencies=[Depends(require_api_key)])
LORAX_GENERATE = "/lorax/generate"  # where LoraxBodies sends a LoRAX body posted to /generate


class MergedAdapters(NullIsAbsent):
    """LoRAX's `parameters.merged_adapters`; `density` and `majority_sign_method` only tune the
    strategies other than linear."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, strict=True)

    _utf8 = field_validator("*")(encodable)

    ids: list[str] = Field(min_length=1)
    weights: list[float] = Field(default_factory=list)
    merge_strategy: str = "linear"
    density: float = 1.0
    majority_sign_method: str | None = None

    def parts(self) -> tuple[Part, ...]:
        if self.merge_strategy.lower() != "linear":
            raise InvalidRequestError(f"parameters.merged_adapters.merge_strategy: expected linear (hotswap combines "
                                      f"adapters exactly, as its `adapters` list), got {self.merge_strategy!r}")
        weights = self.weights or [1.0] * len(self.ids)  # LoRAX: no weights, all ones
        if len(weights) != len(self.ids):
            raise InvalidRequestError(f"parameters.merged_adapters.weights: expected one per id ({len(self.ids)}), "
                                      f"got {len(weights)}")
        return check_parts([Part(name, w) for name, w in zip(self.ids, weights)])


class LoraxParameters(Moded, KnownFields, NullIsAbsent):
    # values of another JSON type are refused, as LoRAX's router refuses them; an int stands for a float
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, strict=True)

    _utf8 = field_validator("*")(encodable)
    misplaced: ClassVar[dict[str, str]] = {
        name: "the adapter in parameters.adapter_id (several: parameters.merged_adapters)"
        for name in ("adapter", "adapter_name", "adapters", "lora", "model")
    }

    adapter_id: str | None = None
    adapter_source: str | None = None
    merged_adapters: MergedAdapters | None = None
    do_sample: bool = False
    max_new_tokens: int | None = Field(None, ge=1)
    ignore_eos_token: bool = False
    repetition_penalty: float | None = Field(None, gt=0)
    return_full_text: bool = False
    stop: Stops = Field(default_factory=list)
    seed: int | None = Field(None, ge=0, le=2**64 - 1)
    temperature: float | None = Field(None, ge=0, le=100)
    top_k: int | None = Field(None, ge=1)
    top_p: float | None = Field(None, gt=0, le=1)
    truncate: int | None = Field(None, ge=1)
    typical_p: float | None = Field(None, gt=0, le=1)
    best_of: int | None = Field(None, ge=1)
    watermark: bool = False
    details: bool = False
    decoder_input_details: bool = False
    return_k_alternatives: int | None = Field(None, ge=1, le=20)
    response_format: dict | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    top_n_tokens: int | None = Field(None, ge=0)
    apply_chat_template: bool = False

    def unsupported(self) -> str | None:
        """The first asked-for feature hotswap does not implement, as a message; None if none."""
        asks = {"response_format": self.response_format is not None,
                "best_of": (self.best_of or 1) > 1, "watermark": self.watermark,
                "repetition_penalty": self.repetition_penalty not in (None, 1.0),
                "typical_p": self.typical_p not in (None, 1.0),
                "frequency_penalty": self.frequency_penalty not in (None, 0.0),
                "presence_penalty": self.presence_penalty not in (None, 0.0),
                "top_n_tokens": bool(self.top_n_tokens), "apply_chat_template": self.apply_chat_template}
        name = next((k for k, asked in asks.items() if asked), None)
        return f"parameters.{name}: expected it unset (hotswap does not implement it), got {getattr(self, name)!r}" if name else None

    @property
    def sampling(self) -> bool:
        if self.temperature == 0:
            return False
        return self.do_sample or self.temperature not in (None, 1.0) or self.top_k is not None or self.top_p not in (None, 1.0)

    def params(self, max_new_tokens: int) -> SamplingParams:
        return SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=(self.temperature or 1.0) if self.sampling else 0.0,
            top_p=self.top_p or 1.0,
            top_k=self.top_k or 0,
            # as LoRAX: a sampled request without a seed gets one drawn, which its details report
            seed=self.seed if self.seed is not None or not self.sampling else secrets.randbits(63),
            stop=tuple(s for s in self.stop if s),
            ignore_eos=self.ignore_eos_token,
            logprobs=self.return_k_alternatives or 0,  # every LoRAX token carries its logprob
            prompt_logprobs=0 if self.decoder_input_details else None,
        )


class LoraxRequest(NullIsAbsent):
    model_config = ConfigDict(extra="ignore", strict=True)

    _utf8 = field_validator("inputs")(encodable)

    inputs: str = Field(min_length=1)
    parameters: LoraxParameters = Field(default_factory=LoraxParameters)
    stream: bool = False


@router.post("/")
async def compat_generate(body: LoraxRequest, request: Request):
    """TGI's compatibility route: `stream` picks the events, else a list of one response."""
    if body.stream:
        return await generate_stream(body, request)
    return [await _generate(body, request)]


@router.post(LORAX_GENERATE, include_in_schema=False)
async def lorax_generate(body: LoraxRequest, request: Request) -> dict:
    return await _generate(body, request)


@router.post("/generate_stream")
async def generate_stream(body: LoraxRequest, request: Request) -> EventStream:
    gen: Generation = request.app.state.generation
    job = await _job(gen, body, request)
    first, rest = await gen.start(job)
    prefix = body.inputs if body.parameters.return_full_text else ""
    return stream_response(first, rest, _StreamRenderer(gen, job, body.parameters, prefix), request.url.path)


async def _generate(body: LoraxRequest, request: Request) -> dict:
    gen: Generation = request.app.state.generation
    job = await _job(gen, body, request)
    out = await gen.run(job)
    p = body.parameters
    response = {"generated_text": (body.inputs if p.return_full_text else "") + out.text}
    if p.details or p.decoder_input_details:
        response["details"] = {**_summary(gen, job, out, p), "prefill": _prefill(gen, job, out),
                               "tokens": [_token(gen, out, k, p) for k in range(len(out.token_ids))],
                               "best_of_sequences": None}
    return response


async def _job(gen: Generation, body: LoraxRequest, request: Request) -> Job:
    p = body.parameters
    problem = p.unsupported()
    if problem:
        raise InvalidRequestError(problem)
    selection = _selection(p, gen.base.name)
    ids = await gen.tokenize(body.inputs, None, "inputs")
    if p.truncate:
        ids = ids[-p.truncate:]
    limit = p.max_new_tokens or default_max_tokens(request.app, selection, ids)
    job = await gen.job(selection, ids, p.params(limit), p.mode)
    return replace(job, cut_stops=False)  # as LoRAX answers: the stop sequence that ended it stays


def _selection(p: LoraxParameters, base_name: str) -> Selection:
    if p.merged_adapters is None:
        return None if p.adapter_id == base_name else p.adapter_id
    if p.adapter_id:
        raise InvalidRequestError(f"parameters.adapter_id: expected it unset with merged_adapters (they name the "
                                  f"adapters), got {p.adapter_id!r}")
    return p.merged_adapters.parts()


def _summary(gen: Generation, job: Job, out: Outcome, p: LoraxParameters) -> dict:
    return {"finish_reason": _finish_reason(gen, job, out), "prompt_tokens": job.prompt_tokens,
            "generated_tokens": len(out.token_ids), "seed": job.params.seed if p.sampling else None}


def _finish_reason(gen: Generation, job: Job, out: Outcome) -> str:
    if out.finish_reason != "stop":
        return out.finish_reason
    eos = not job.params.ignore_eos and out.token_ids and out.token_ids[-1] in gen.base.eos_ids
    return "eos_token" if eos else "stop_sequence"


def _token(gen: Generation, out: Outcome, k: int, p: LoraxParameters, text: str | None = None) -> dict:
    """Generated token k: id, text (its own decoded text unless given), logprob, special, alternatives."""
    tok, token_id, score = gen.base.tokenizer, out.token_ids[k], out.logprobs[k]
    token = {"id": token_id, "text": tok.decode([token_id]) if text is None else text, "logprob": score.logprob,
             "special": token_id in tok.all_special_ids}
    if p.return_k_alternatives:
        token["alternative_tokens"] = [{"id": i, "text": tok.decode([i]), "logprob": lp} for i, lp in score.top]
    return token


def _prefill(gen: Generation, job: Job, out: Outcome) -> list[dict]:
    if out.prompt_logprobs is None:
        return []
    tok, ids = gen.base.tokenizer, job.prompt_ids
    scores = [None, *(s.logprob for s in out.prompt_logprobs)]
    return [{"id": i, "text": tok.decode([i]), "logprob": lp} for i, lp in zip(ids, scores)]


class _StreamRenderer:
    """Each token's event goes out when the next item comes, so the last one can carry the text
    still held (a partial character), `generated_text` and `details`, as LoRAX's last event does."""

    def __init__(self, gen: Generation, job: Job, p: LoraxParameters, prefix: str) -> None:
        self.gen, self.job, self.p, self.prefix = gen, job, p, prefix
        self.pending: str | None = None  # the previous token's text, not sent yet
        self.k = -1  # index of that token

    def __call__(self, item: Item) -> str:
        token_id, delta, out = item
        if token_id is not None:
            line = self._event(out, None) if self.pending is not None else ""
            self.pending, self.k = delta, self.k + 1
            return line
        self.pending += delta
        return self._event(out, self._final(out))

    def _event(self, out: Outcome, final: dict | None) -> str:
        event = {"token": _token(self.gen, out, self.k, self.p, self.pending), "generated_text": None, "details": None}
        if final:
            event.update(final)
        return f"data: {json.dumps(event)}\n\n"

    def _final(self, out: Outcome) -> dict:
        return {"generated_text": self.prefix + out.text, "details": _summary(self.gen, self.job, out, self.p)}


class LoraxBodies:
    """ASGI middleware: a `POST /generate` whose JSON body is LoRAX's goes to LORAX_GENERATE.

    The body is read once, looked at, and replayed to the app unchanged."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != "/generate":
            return await self.app(scope, receive, send)
        messages, body = [], b""
        while True:
            message = await receive()
            messages.append(message)
            body += message.get("body", b"")
            if message["type"] != "http.request" or not message.get("more_body", False):
                break
        if is_lorax_body(body):
            scope = {**scope, "path": LORAX_GENERATE, "raw_path": LORAX_GENERATE.encode()}
        replay = iter(messages)

        async def replayed():
            return next(replay, None) or await receive()

        await self.app(scope, replayed, send)


def is_lorax_body(body: bytes) -> bool:
    """LoRAX's body has `inputs`; ours has `prompt` or `prompt_token_ids` and never `inputs`."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):  # not JSON, or nested too deep: the route's own parsing refuses it
        return False
    return isinstance(data, dict) and is_lorax_object(data)


def is_lorax_object(data: dict) -> bool:
    """A parsed body is LoRAX's: it has `inputs` and neither of ours, `prompt` or `prompt_token_ids`."""
    return "inputs" in data and not {"prompt", "prompt_token_ids"} & data.keys()
