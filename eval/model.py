"""The lm-eval model "dsv3": lm-eval's HFLM on our checkpoints, plus reasoning-model handling.

Scoring is HFLM's own (same tokenization, batching and log-likelihood code), so numbers equal stock
`lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True`. What it adds:

- `trust_remote_code=True` by default (every folder we write carries the remote code) and one-line errors for
  a folder without config or tokenizer, before transformers fails obscurely;
- `strip_thinking=True` for R1-style models: stop strings count only after `</think>` (lm-eval would stop a
  generation at a "\\n\\n" inside the reasoning, issue #2682), the answer scored is the text after the last
  `</think>`, and a reasoning block that never closes scores as an empty answer (as lighteval does), never as
  its reasoning text.

Every format we write loads through `AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` (BF16,
FP8 kept with `fp8_mode=keep` or dequantized, INT8 / GPTQ); extra model arguments go to from_pretrained.
Generation runs through the model's own `generate` (our remote code's KV-cache decode, absorbed MLA); with
`use_mtp=True`, through its MTP speculative decoding (same greedy output, fewer main-model forwards when
drafts are accepted).
"""

from pathlib import Path

import torch
import transformers
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

THINK_START, THINK_END = "<think>", "</think>"


def prompt_opens_thinking(prompt: str, start: str = THINK_START, end: str = THINK_END) -> bool:
    """The prompt leaves a reasoning block open (R1's chat template ends the prompt in "<think>\\n")."""
    return prompt.rfind(start) > prompt.rfind(end)


def unclosed_thinking(opened: bool, completion: str, end: str = THINK_END) -> bool:
    """The completion is still inside a reasoning block at its end (opened by the prompt or by itself)."""
    return (opened or completion.lstrip().startswith(THINK_START)) and end not in completion


class ThinkingAwareStop(transformers.StoppingCriteria):
    """Stops a batch when every row's answer (the text after the reasoning block) holds a stop string.

    A row is thinking while its prompt left `<think>` open, or its completion starts with `<think>`, and no
    `</think>` has come yet; stop strings inside the reasoning do not count."""

    LOOKBACK = 8  # tokens decoded each step to spot the end tag as it is generated

    def __init__(self, tokenizer, stop: list[str], prompt_len: int, opened: list[bool], end: str = THINK_END):
        self.tokenizer, self.stop, self.prompt_len, self.end = (
            tokenizer,
            [s for s in stop if s],
            prompt_len,
            end,
        )
        self.thinking = list(opened)
        self.undecided = [not o for o in opened]  # completion may still open a block with its first tokens
        self.answer_from = [0] * len(opened)  # token offset in the completion where the answer text starts
        self.done = [False] * len(opened)

    def _decode(self, ids: torch.Tensor) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> bool:
        gen = input_ids[:, self.prompt_len :]
        n = gen.shape[1]
        for i in range(len(self.done)):
            if self.done[i]:
                continue
            if self.undecided[i]:
                head = self._decode(gen[i]).lstrip()
                if head.startswith(THINK_START):
                    self.thinking[i], self.undecided[i] = True, False
                elif THINK_START.startswith(head):
                    continue  # empty or a prefix of "<think>": wait for the next token
                else:
                    self.undecided[i] = False
            if self.thinking[i]:
                if self.end not in self._decode(gen[i, -self.LOOKBACK :]):
                    continue
                self.thinking[i] = False
                self.answer_from[i] = max(0, n - self.LOOKBACK)  # the end tag lies in these last tokens
            # As HFLM's post-processing: the answer starts after the tag, leading whitespace dropped.
            answer = self._decode(gen[i, self.answer_from[i] :]).split(self.end)[-1].lstrip()
            self.done[i] = any(s in answer for s in self.stop)
        return all(self.done)


@register_model("dsv3")
class DSV3LM(HFLM):
    def __init__(
        self,
        pretrained: str | transformers.PreTrainedModel,
        trust_remote_code: bool = True,
        strip_thinking: bool = False,
        think_end_token: str | int | None = None,
        use_mtp: bool = False,
        **kwargs,
    ) -> None:
        if isinstance(pretrained, str | Path) and Path(pretrained).is_dir():
            from dsv3.generate import check_model_folder

            check_model_folder(Path(pretrained))
            pretrained = str(pretrained)
        if strip_thinking and think_end_token is None:
            think_end_token = THINK_END
        super().__init__(
            pretrained, trust_remote_code=trust_remote_code, think_end_token=think_end_token, **kwargs
        )
        self.strip_thinking, self.use_mtp = bool(strip_thinking), bool(use_mtp)
        self._think_end_text = THINK_END
        if self.strip_thinking and isinstance(self.think_end_token, int):
            self._think_end_text = self.tokenizer.decode([self.think_end_token], skip_special_tokens=False)
        elif self.strip_thinking:
            # One token id when the tag is a single token (R1's tokenizer): HFLM then cuts the completion by
            # id, which also works when decoding drops the tag as a special token.
            self._think_end_text = self.think_end_token
            ids = self.tokenizer.encode(self.think_end_token, add_special_tokens=False)
            if len(ids) == 1:
                self.think_end_token = ids[0]

    def _model_generate(self, context, max_length: int, stop: list[str], **generation_kwargs) -> torch.Tensor:
        if not self.strip_thinking and not self.use_mtp:
            return super()._model_generate(context, max_length, stop, **generation_kwargs)
        # As HFLM: greedy unless the task samples.
        generation_kwargs["temperature"] = generation_kwargs.get("temperature", 0.0)
        if generation_kwargs["temperature"] == 0.0 and generation_kwargs.get("do_sample") is None:
            generation_kwargs["do_sample"] = False
        if generation_kwargs.get("do_sample") is False and generation_kwargs["temperature"] == 0.0:
            generation_kwargs.pop("temperature")
        P = context.shape[1]
        prompts = self.tokenizer.batch_decode(context, skip_special_tokens=False)
        end = self._think_end_text
        opened = [prompt_opens_thinking(p, end=end) for p in prompts]
        common = dict(input_ids=context, max_length=max_length, pad_token_id=self.tokenizer.pad_token_id)
        if self.use_mtp:
            # MTP speculative decoding takes no stopping criteria: it runs to EOS or max_length and HFLM cuts
            # the text at the first stop string afterwards, the same text greedy decoding with stop strings
            # gives.
            out = self.model.generate(**common, use_mtp=True, use_cache=True, **generation_kwargs)
        else:
            criteria = transformers.StoppingCriteriaList(
                [ThinkingAwareStop(self.tokenizer, stop, P, opened, end)]
            )
            out = self.model.generate(
                **common, stopping_criteria=criteria, use_cache=True, **generation_kwargs
            )
        if self.strip_thinking:
            # A reasoning block that never closed has no answer: blank the completion with EOS (decodes as "")
            completions = self.tokenizer.batch_decode(out[:, P:], skip_special_tokens=False)
            for i, (o, c) in enumerate(zip(opened, completions, strict=True)):
                if unclosed_thinking(o, c, end):
                    out[i, P:] = self.eot_token_id
        return out
