"""Shared by the data tests: a character tokenizer and file writers."""

import csv
import json

IGN = -100


class CharTokenizer:
    """One token per character (id = ord + 3); bos 1, eos 2, pad 0."""

    bos_id, eos_id, pad_id = 1, 2, 0
    vocab_size = 200

    def encode(self, text, add_bos=True, add_eos=True):
        return [self.bos_id] * add_bos + [ord(c) + 3 for c in text] + [self.eos_id] * add_eos

    def decode(self, ids):
        return "".join(chr(i - 3) for i in ids if i > 2)


def enc(text):
    return CharTokenizer().encode(text, add_bos=False, add_eos=False)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def write_csv(path, rows, header=("sentence", "label")):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return str(path)


def byte_level_qwen_tokenizer(directory, max_seq_len=None):
    """``qwen2_5_tokenizer`` on a vocab.json / merges.txt written to ``directory``: the 256
    byte tokens (ids 0..255) and one merge, "\\n\\n" (id 256)."""
    from torchtune.models.qwen2._tokenizer import bytes_to_unicode
    from torchtune.models.qwen2_5 import qwen2_5_tokenizer

    chars = bytes_to_unicode()
    vocab = {chars[b]: b for b in range(256)}
    newline = chars[ord("\n")]
    vocab[newline * 2] = 256
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text(f"#version: 0.2\n{newline} {newline}\n")
    return qwen2_5_tokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"),
                             max_seq_len=max_seq_len)
