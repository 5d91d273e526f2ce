import pytest

from pipelines.data.tokenizer import document_separator, load_tokenizer, tokenizer_files, vocab_hash
from pipelines.errors import InputError
from tests.conftest import bpe_tokenizer


def test_tokenizer_json_and_its_folder_are_the_same_tokenizer():
    files = bpe_tokenizer()
    from_file = load_tokenizer(str(files.json))
    from_folder = load_tokenizer(str(files.folder))  # a transformers folder: read by AutoTokenizer
    assert from_file.vocab_size == files.vocab_size == 1024
    assert vocab_hash(from_file) == vocab_hash(from_folder)
    assert document_separator(from_file, "") == ("<|endoftext|>", files.separator_id)
    assert document_separator(from_folder, "") == ("<|endoftext|>", files.separator_id)
    assert files.folder / "tokenizer.json" in tokenizer_files(str(files.folder))
    text = "Friends, Romans, countrymen, lend me your ears"
    assert from_file.backend.encode(text).ids == from_folder.backend.encode(text).ids


def test_eos_override_must_be_in_the_vocabulary(tokenizer_path):
    tokenizer = load_tokenizer(str(tokenizer_path))
    assert document_separator(tokenizer, "!") == ("!", tokenizer.get_vocab()["!"])
    with pytest.raises(InputError, match=r"`data.eos_token` '</s>' is not in the vocabulary of tokenizer"):
        document_separator(tokenizer, "</s>")


@pytest.mark.real_data
def test_gpt2_tokenizer_json_and_its_folder_are_the_same_tokenizer(gpt2_tokenizer):
    from_file = load_tokenizer(str(gpt2_tokenizer))
    from_folder = load_tokenizer(str(gpt2_tokenizer.parent))
    assert from_file.vocab_size == 50257
    assert vocab_hash(from_file) == vocab_hash(from_folder)
    assert document_separator(from_file, "") == ("<|endoftext|>", 50256)
    assert gpt2_tokenizer in tokenizer_files(str(gpt2_tokenizer.parent))


@pytest.mark.slow
@pytest.mark.real_data
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
