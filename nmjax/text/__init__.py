"""Text for the language encoders (nmjax.models.text_encoders): a checkpoint's tokenizer, read
from its own files by Hugging Face's `tokenizers` (the `text` extra).

    from nmjax import text
    ids, mask = text.tokenizer("bert-base-uncased/").encode(texts, max_length=128)
"""

from nmjax.text.tokenization import TOKENIZER_FILES, TextTokenizer, tokenizer

__all__ = ["tokenizer", "TextTokenizer", "TOKENIZER_FILES"]
