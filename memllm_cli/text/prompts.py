"""How memory and a question are laid out as tokens, per model.

Reading a memory is equivalent to a prompt of the form

    [ sink | memory tokens | question block ]

The *sink* is a short fixed prefix that is never dropped: for a chat model, its chat
template up to the start of the user's message (system prompt included); for a base model,
its BOS token. Attention heads park most of their weight on the first tokens of a sequence
(the "attention sink"); pinning those tokens keeps them in place however many memory tokens
are dropped or added after them. Every chunk is written after the same sink, so its states
are computed in the position it will be read in.
"""

from __future__ import annotations

from dataclasses import dataclass

_MARK = "\u2063MEMLLM\u2063"  # an invisible separator that no template or user text contains
QUESTION = "Answer the question using the text above.\nQuestion: {question}"


@dataclass(frozen=True)
class PromptFormat:
    sink_text: str  # text of the pinned prefix (special tokens spelled out)
    question_template: str  # "{question}" is replaced; the rest closes the turn
    chat: bool

    @classmethod
    def for_tokenizer(cls, tokenizer) -> PromptFormat:
        if getattr(tokenizer, "chat_template", None):
            rendered = tokenizer.apply_chat_template(
                [{"role": "user", "content": _MARK}], add_generation_prompt=True, tokenize=False
            )
            if rendered.count(_MARK) == 1:
                head, tail = rendered.split(_MARK)
                return cls(head, QUESTION + tail, chat=True)
        bos = tokenizer.bos_token or tokenizer.eos_token or ""
        return cls(bos, QUESTION + "\nAnswer:", chat=False)

    def sink_ids(self, tokenizer) -> list[int]:
        return tokenizer(self.sink_text, add_special_tokens=False).input_ids

    def question_ids(self, tokenizer, question: str) -> list[int]:
        text = self.question_template.replace("{question}", question.strip())
        return tokenizer(text, add_special_tokens=False).input_ids

    def question_span(self, tokenizer, question: str) -> tuple[int, int]:
        """Where the question's own words lie in `question_ids`: [start, end). Where the
        template's tokens do not split cleanly at the question, the whole prompt but its
        first token."""
        ids = self.question_ids(tokenizer, question)
        head = self.question_template.split("{question}")[0]
        before = tokenizer(head.rstrip(), add_special_tokens=False).input_ids
        through = tokenizer(head + question.strip(), add_special_tokens=False).input_ids
        if 0 < len(before) < len(through) <= len(ids) and ids[:len(through)] == through \
                and through[:len(before)] == before:
            return len(before), len(through)
        return 1, len(ids)


@dataclass(frozen=True)
class TrainedPrompt:
    """Questions for the trained checkpoints, as the official README asks them: a chat
    checkpoint gets its chat template with the leading BOS token removed (the model has its
    own trained bos embeddings); a base checkpoint gets "Question: ... Answer:". No sink:
    the model reads its memory pool itself."""

    chat: bool
    drop_bos: bool
    sink_text: str = ""

    @classmethod
    def for_tokenizer(cls, tokenizer, *, bos_embedding: bool) -> TrainedPrompt:
        return cls(chat=bool(getattr(tokenizer, "chat_template", None)), drop_bos=bos_embedding)

    def sink_ids(self, tokenizer) -> list[int]:
        return []

    def question_ids(self, tokenizer, question: str) -> list[int]:
        if not self.chat:
            return tokenizer(f"Question: {question.strip()} Answer:", add_special_tokens=False).input_ids
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": question.strip()}], add_generation_prompt=True, tokenize=False
        )
        ids = tokenizer(text, add_special_tokens=False).input_ids
        if self.drop_bos and ids and ids[0] == tokenizer.bos_token_id:
            ids = ids[1:]
        return ids
