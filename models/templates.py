"""Prompt builders for likelihood scoring: the reference templates, reproduced exactly, and the model's chat template.

Each builder turns (instruction, input, output) into two `ScoreRequest`s: the answer conditioned on the prompt, and
the answer "direct" (with only what the reference puts before it). Text, answer span and truncation follow
`REFERENCE.md`, quirks included:

- the answer span starts at `start_token = len(encode(text[:text.rfind(output)]))`: the prefix is tokenized on its
  own (BOS included), so a token merging across the prompt/answer boundary shifts the span as in the reference;
- Cherry (`wiz`, `alpaca`): direct text `'### Response:' + output`, cut to `max_length - instruction_tokens + 4`
  tokens, where `wiz` counts the raw instruction only (its input is not counted, as in the reference);
- Superfiltering (`superfilter`): prompt `"{instruction}\\n{input}\\n"` (`"{instruction}\\n"` without input),
  direct text = the raw output scored whole (every token after the first position), cut to
  `max_length - prompt_tokens + 1`;
- `chat`: the tokenizer's chat template; the span is the assistant turn (its end-of-turn tokens included), the
  direct text is the assistant header + that span (with the template's leading BOS, if any), cut like Cherry's.

Where the reference scores garbage or crashes, a pair is skipped with a reason instead (never a default score):
the instruction alone fills `max_length`, the output is empty, the answer span is empty after truncation, or a chat
template changes the output's text (e.g. trims it), so its tokens cannot be found.
Cherry's own check is kept: skip when instruction tokens + direct answer tokens exceed `max_length` (after the
direct text's cut this fires only for tokenizers that spend few tokens on BOS + "### Response:"). Otherwise the
reference truncates an overlong pair, and so does the default; `overlong="skip"` skips every truncated pair.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from models.likelihood import ScoreRequest

TemplateName = Literal["wiz", "alpaca", "superfilter", "chat"]
TEMPLATES: tuple[str, ...] = ("wiz", "alpaca", "superfilter", "chat")

# Stanford Alpaca's PROMPT_DICT, as Cherry_LLM copies it.
ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)
# Superfiltering's PROMPT_DICT_NONE.
PLAIN_PROMPT_INPUT = "{instruction}\n{input}\n"
PLAIN_PROMPT_NO_INPUT = "{instruction}\n"
CHERRY_DIRECT_PREFIX = "### Response:"

SKIP_INSTRUCTION_TOO_LONG = "instruction fills max_length"
SKIP_EMPTY_OUTPUT = "empty output"
SKIP_EMPTY_SPAN = "empty answer span after truncation"
SKIP_OVERLONG = "prompt + answer longer than max_length"
SKIP_CHERRY_LENGTH_CHECK = "instruction + direct answer longer than max_length (Cherry's data_by_IFD check)"
SKIP_TEMPLATE_ALTERED = ("the chat template altered the response text (e.g. trimmed its whitespace), so its tokens "
                         "cannot be located in the rendered conversation")


@dataclass(frozen=True)
class ScorePair:
    """The two requests of one sample, or why it cannot be scored."""

    conditioned: ScoreRequest | None
    direct: ScoreRequest | None
    instruction_tokens: int | None  # None: not tokenized (tasks.score skips a text holding a special token's string)
    truncated: bool = False
    skip_reason: str | None = None


def _encode(tokenizer, text: str, max_length: int | None = None, special: bool = True) -> list[int]:
    if max_length is None:
        return list(tokenizer.encode(text, add_special_tokens=special))
    return list(tokenizer.encode(text, add_special_tokens=special, truncation=True, max_length=max_length))


def _span_request(tokenizer, text: str, span: str, max_length: int, special: bool = True) -> tuple[ScoreRequest, bool]:
    """The reference's `get_perplexity_and_embedding_part_text`: truncate, then score from `start_token` on."""
    ids = _encode(tokenizer, text, max_length, special)
    truncated = len(_encode(tokenizer, text, None, special)) > len(ids)
    at = text.rfind(span)
    if at < 0:  # build_pair skips such pairs first; -1 here would silently score from the last character
        raise ValueError("the answer is not in the text to score")
    start_token = len(_encode(tokenizer, text[:at], None, special))
    return ScoreRequest(tuple(ids), start_token), truncated


def user_message(instruction: str, input_text: str) -> str:
    """The user turn the chat template sees: the same join `tasks.data` uses for Alpaca rows."""
    return f"{instruction}\n\n{input_text}" if input_text.strip() else instruction


def instruction_text(template: TemplateName, tokenizer, instruction: str, input_text: str) -> str:
    """The text the reference treats as "the instruction" (its perplexity, its embedding, its token count)."""
    if template == "wiz":
        return instruction  # the reference's quirk: the input is not part of instruct_i
    if template == "alpaca":
        return (ALPACA_PROMPT_INPUT if input_text != "" else ALPACA_PROMPT_NO_INPUT).format(
            instruction=instruction, input=input_text)
    if template == "superfilter":
        return (PLAIN_PROMPT_INPUT if input_text != "" else PLAIN_PROMPT_NO_INPUT).format(
            instruction=instruction, input=input_text)
    if template == "chat":
        return tokenizer.apply_chat_template([{"role": "user", "content": user_message(instruction, input_text)}],
                                             tokenize=False, add_generation_prompt=True)
    raise ValueError(f"unknown template {template!r}: expected one of {TEMPLATES}")


def prompt_text(template: TemplateName, tokenizer, instruction: str, input_text: str) -> str:
    """The text a reference template writes before the output (the conditioned text is this + output)."""
    if template == "wiz":
        return (instruction + "\nInput:" + input_text + "\n\n### Response:" if input_text != ""
                else instruction + "\n\n### Response:")
    if template in ("alpaca", "superfilter"):
        return instruction_text(template, tokenizer, instruction, input_text)
    raise ValueError(f"template {template!r} has no plain-text prompt (a chat template renders messages)")


def instruction_request(template: TemplateName, tokenizer, instruction: str, input_text: str,
                        max_length: int) -> ScoreRequest:
    """The whole-text perplexity request of the instruction alone (Cherry's `--mod pre`)."""
    text = instruction_text(template, tokenizer, instruction, input_text)
    return ScoreRequest(tuple(_encode(tokenizer, text, max_length, special=template != "chat")), 0)


def _finish(cond: ScoreRequest, direct: ScoreRequest, n_instr: int, truncated: bool, overlong: str) -> ScorePair:
    if overlong == "skip" and truncated:
        return ScorePair(None, None, n_instr, True, SKIP_OVERLONG)
    if cond.n_targets <= 0 or direct.n_targets <= 0:
        return ScorePair(None, None, n_instr, truncated, SKIP_EMPTY_SPAN)
    return ScorePair(cond, direct, n_instr, truncated)


def build_pair(template: TemplateName, tokenizer, instruction: str, input_text: str, output: str,
               max_length: int, overlong: Literal["truncate", "skip"] = "truncate") -> ScorePair:
    """Conditioned and direct requests of one sample under `template` (see the module docstring)."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}: expected one of {TEMPLATES}")
    special = template != "chat"  # chat templates write their own special tokens
    instr = instruction_text(template, tokenizer, instruction, input_text)
    n_instr = len(_encode(tokenizer, instr, max_length, special))
    if output == "":
        return ScorePair(None, None, n_instr, False, SKIP_EMPTY_OUTPUT)
    if template == "superfilter":
        if max_length - n_instr + 1 <= 1:
            return ScorePair(None, None, n_instr, False, SKIP_INSTRUCTION_TOO_LONG)
        cond, cut_cond = _span_request(tokenizer, instr + output, output, max_length)
        direct_ids = _encode(tokenizer, output, max_length - n_instr + 1)
        cut_direct = len(_encode(tokenizer, output)) > len(direct_ids)
        return _finish(cond, ScoreRequest(tuple(direct_ids), 0), n_instr, cut_cond or cut_direct, overlong)
    if max_length - n_instr <= 0:
        return ScorePair(None, None, n_instr, False, SKIP_INSTRUCTION_TOO_LONG)
    if template == "wiz":
        whole = prompt_text(template, tokenizer, instruction, input_text) + output
        direct_text, direct_max = CHERRY_DIRECT_PREFIX + output, max_length - n_instr + 4
    elif template == "alpaca":
        whole = instr + output
        direct_text, direct_max = CHERRY_DIRECT_PREFIX + output, max_length - n_instr + 4
    else:  # chat
        whole = tokenizer.apply_chat_template(
            [{"role": "user", "content": user_message(instruction, input_text)},
             {"role": "assistant", "content": output}], tokenize=False)
        bare = tokenizer.apply_chat_template([{"role": "user", "content": user_message(instruction, input_text)}],
                                             tokenize=False, add_generation_prompt=False)
        answer_at = whole.rfind(output)
        # Not in the text at all (a `| trim` template), or only inside the user's turn: the span would start at a
        # wrong place (rfind's -1 is the last character) and be skipped with a false reason, or scored wrongly.
        if answer_at < 0 or (whole.startswith(bare) and answer_at < len(bare)):
            return ScorePair(None, None, n_instr, False, SKIP_TEMPLATE_ALTERED)
        header = instr[len(bare):] if instr.startswith(bare) else ""
        lead = tokenizer.bos_token if tokenizer.bos_token and whole.startswith(tokenizer.bos_token) else ""
        direct_text = lead + header + whole[answer_at:]
        direct_max = max_length - n_instr + len(_encode(tokenizer, lead + header, None, False))
    cond, cut_cond = _span_request(tokenizer, whole, output, max_length, special)
    direct, cut_direct = _span_request(tokenizer, direct_text, output, direct_max, special)
    if n_instr + direct.n_targets > max_length:  # rarely true after the direct cut, but the authors skip it
        return ScorePair(None, None, n_instr, True, SKIP_CHERRY_LENGTH_CHECK)
    return _finish(cond, direct, n_instr, cut_cond or cut_direct, overlong)
