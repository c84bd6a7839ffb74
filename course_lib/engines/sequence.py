"""A request as the paged engine serves it: its tokens so far, and how many the cache holds."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(eq=False)       # a sequence is itself: `in`, `remove` compare identity, not token lists
class Sequence:
    req: object
    tokens: list = field(default_factory=list)    # prompt + answer so far: what the cache must hold
    cached: int = 0       # of which the cache holds K and V (computed or prefix hits: vLLM's
    #                       num_computed_tokens)
    # with overlap (chapter 09) the last token may still be on the device: None here, and ``src``
    # says where it is among the tokens the step in flight samples (``ModelRunner.last``)
    src: int = -1
    finished: bool = False

    @classmethod
    def of(cls, req) -> "Sequence":
        return cls(req, list(req.prompt_tokens))

    @property
    def pending(self) -> int:
        """Tokens to feed before the next token can be sampled (1 for a decode)."""
        return len(self.tokens) - self.cached
