import pytest

from pipelines.errors import InputError
from pipelines.tokenizer import document_separator, load_tokenizer, tokenizer_files, vocab_hash


def test_tokenizer_json_and_its_folder_are_the_same_tokenizer(gpt2_tokenizer):
    from_file = load_tokenizer(str(gpt2_tokenizer))
    from_folder = load_tokenizer(str(gpt2_tokenizer.parent))
    assert from_file.vocab_size == 50257
    assert vocab_hash(from_file) == vocab_hash(from_folder)
    assert document_separator(from_file, "") == ("<|endoftext|>", 50256)
    assert gpt2_tokenizer in tokenizer_files(str(gpt2_tokenizer.parent))


def test_eos_override_must_be_in_the_vocabulary(gpt2_tokenizer):
    tokenizer = load_tokenizer(str(gpt2_tokenizer))
    assert document_separator(tokenizer, "!") == ("!", 0)
    with pytest.raises(InputError, match=r"`data.eos_token` '</s>' is not in the vocabulary of tokenizer"):
        document_separator(tokenizer, "</s>")


@pytest.mark.slow
def test_gguf_tokenizer_matches_transformers(smollm2_gguf, gpt2_tokenizer):
    from transformers import AutoTokenizer

    ours = load_tokenizer(str(smollm2_gguf))
    reference = AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
    text = "A teacher's concepts, in 2025: sparse autoencoders!"
    assert (
        ours.backend.encode(text, add_special_tokens=False).ids
        == reference(text, add_special_tokens=False)["input_ids"]
    )
    # The pretraining document separator, not the chat model's end-of-turn EOS.
    assert document_separator(ours, "") == ("<|endoftext|>", 0)
    assert ours.vocab_size == 49152
    assert vocab_hash(ours) != vocab_hash(load_tokenizer(str(gpt2_tokenizer)))
