"""A test-only vLLM logits processor that forces a request's output to given token ids.

Random weights never write a tool call, so the tool-call tests steer the served model: a request
with `vllm_xargs={"force_tokens": [id, ...]}` gets, at output step k, every logit but that of
ids[k] set to -inf (then, past the list, the model's own logits). Loaded by the server with
`--logits-processors tests.forced_tokens:ForcedTokens` (PYTHONPATH = the checkout); requests
without the argument are untouched.
"""
from __future__ import annotations

import torch
from vllm.v1.sample.logits_processor import AdapterLogitsProcessor

ARG = "force_tokens"


class ForcedTokens(AdapterLogitsProcessor):
    def is_argmax_invariant(self) -> bool:
        return False

    def new_req_logits_processor(self, params):
        ids = (params.extra_args or {}).get(ARG)
        if not ids:
            return None
        ids = [int(i) for i in ids]

        def force(output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
            k = len(output_ids)
            if k < len(ids):
                keep = logits[ids[k]].clone()
                logits.fill_(float("-inf"))
                logits[ids[k]] = keep
            return logits

        return force
