"""Fine-tuning data: chat JSONL reading (fields pass through), chat-template tokenisation, loss masks, batches."""

from concept_influence.data.chat import (
    ChatDataset,
    ChatRow,
    DataFormatError,
    parse_chat_record,
    read_chat_jsonl,
    rows_from_records,
    write_json_atomic,
    write_jsonl_atomic,
    write_text_atomic,
)
from concept_influence.data.tokenize import (
    PLAIN_TEMPLATE,
    TokenizedDataset,
    TokenizedRow,
    collate,
    iter_batches,
    render_conversation,
    render_prompt,
    tokenize_chat,
    tokenize_messages,
)

__all__ = [
    "PLAIN_TEMPLATE",
    "ChatDataset",
    "ChatRow",
    "DataFormatError",
    "TokenizedDataset",
    "TokenizedRow",
    "collate",
    "iter_batches",
    "parse_chat_record",
    "read_chat_jsonl",
    "render_conversation",
    "render_prompt",
    "rows_from_records",
    "tokenize_chat",
    "tokenize_messages",
    "write_json_atomic",
    "write_jsonl_atomic",
    "write_text_atomic",
]
