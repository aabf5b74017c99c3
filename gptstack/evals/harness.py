"""EleutherAI lm-evaluation-harness adapter: evaluate a gptstack model on any lm-eval task.

    import lm_eval
    from gptstack.evals.harness import GptstackLM
    lm_eval.simple_evaluate(model=GptstackLM("runs/demo/pretrain"), tasks=["lambada_openai"])

Importing this module also registers the model as "gptstack" with lm-eval, so
`lm_eval.simple_evaluate(model="gptstack", model_args="model=runs/demo/pretrain", ...)` works.
The three methods delegate to the same scoring code as `gptstack eval prompting`.
"""
from __future__ import annotations

from ..checkpoint import find_tokenizer, load_model
from ..errors import GptstackError
from ..tokenizer import Tokenizer
from .prompting import generate_until, loglikelihood, loglikelihood_rolling, split_whitespace

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError:  # lm-eval is optional: `pip install lm_eval`
    LM = object

    def register_model(*names):
        return lambda cls: cls


@register_model("gptstack")
class GptstackLM(LM):
    def __init__(self, model: str, batch_size: int = 16, device: str = "auto", **kwargs):
        if LM is object:
            raise GptstackError("the lm-eval adapter needs lm-evaluation-harness: pip install lm_eval")
        super().__init__()
        self.model = load_model(model, device)
        self.tok = Tokenizer.load(find_tokenizer(model))
        self.batch_size = int(batch_size)

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        pairs = []
        for r in requests:
            context, continuation = split_whitespace(*r.args[:2])
            ctx = self.tok.encode(context) if context else [self.tok.eot]
            pairs.append((ctx, self.tok.encode(continuation)))
        return loglikelihood(self.model, pairs, self.batch_size)

    def loglikelihood_rolling(self, requests) -> list[float]:
        return [loglikelihood_rolling(self.model, self.tok.encode(r.args[0]), self.tok.eot) for r in requests]

    def generate_until(self, requests) -> list[str]:
        out = []
        for r in requests:  # one at a time: requests may differ in stop strings and lengths
            context, kwargs = r.args[0], dict(r.args[1] or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks", 64))
            ids = self.tok.encode(context) or [self.tok.eot]
            out += generate_until(self.model, self.tok, [ids], until, min(max_new, self.model.cfg.n_ctx - 1))
        return out
