#!/usr/bin/env python3
"""Write a llama-architecture GGUF model with random weights and a small SentencePiece vocabulary.

The weights come from a fixed seed, so two runs write identical files and the model's output at
temperature 0 is deterministic. The output is meaningless text; the model exists to give
llama-server real prefill work and real KV state for tests and demos without downloading weights.
"""

import argparse
import string

import gguf
import numpy as np

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which "
    "but have an they you were her she there been one all we their has would when if so no will "
    "can more other what about time up out into only some could them than then its these two may "
    "first any like now my over such our man me even most made after also did many before must "
    "through back years where much your way well down should because each just those people how "
    "too little state good very make world still own see men work long get here between both life "
    "being under never day same another know while last might us great old year off come since "
    "against go came right used take three cache prefix token model server request slot store"
).split()


def build_vocab():
    """Return (tokens, scores, types) for a byte-fallback SentencePiece vocabulary."""
    tokens = ["<unk>", "<s>", "</s>"]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    tokens += [f"<0x{byte:02X}>" for byte in range(256)]
    types += [gguf.TokenType.BYTE] * 256
    tokens += ["<|im_start|>", "<|im_end|>"]
    types += [gguf.TokenType.CONTROL] * 2

    pieces = []
    for char in string.ascii_letters + string.digits + string.punctuation:
        pieces += [char, "\u2581" + char]
    pieces.append("\u2581")
    pieces += ["\u2581" + word for word in WORDS]
    seen = set(tokens)
    pieces = [piece for piece in pieces if not (piece in seen or seen.add(piece))]

    tokens += pieces
    types += [gguf.TokenType.NORMAL] * len(pieces)
    # Longer pieces get higher scores, so the tokenizer prefers whole words over letters.
    scores = [0.0] * (len(tokens) - len(pieces)) + [float(len(piece)) - 10.0 for piece in pieces]
    return tokens, scores, types


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, required=True, help="number of transformer blocks")
    parser.add_argument("--width", type=int, required=True, help="embedding width")
    parser.add_argument("--heads", type=int, default=0, help="attention heads (default: width / 64)")
    parser.add_argument("--kv-heads", type=int, required=True, help="key/value heads")
    parser.add_argument("--context", type=int, default=32768, help="training context length in tokens")
    parser.add_argument("--name", required=True, help="general.name of the model")
    parser.add_argument("--seed", type=int, default=1234, help="seed of the random weights")
    parser.add_argument("--output", required=True, help="path of the GGUF file to write")
    args = parser.parse_args()

    heads = args.heads or max(1, args.width // 64)
    head_dim = args.width // heads
    kv_width = head_dim * args.kv_heads
    ffn = args.width * 8 // 3 // 64 * 64
    tokens, scores, types = build_vocab()
    rng = np.random.default_rng(args.seed)

    writer = gguf.GGUFWriter(args.output, "llama")
    writer.add_name(args.name)
    writer.add_context_length(args.context)
    writer.add_embedding_length(args.width)
    writer.add_block_count(args.layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(args.kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)

    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(CHATML_TEMPLATE)

    def weights(rows, cols):
        return (rng.standard_normal((rows, cols), dtype=np.float32) * 0.02).astype(np.float16)

    def norm(size):
        return np.ones(size, dtype=np.float32)

    # numpy shapes are (rows, columns); GGUF stores them reversed as ggml's (ne0, ne1).
    writer.add_tensor("token_embd.weight", weights(len(tokens), args.width))
    for block in range(args.layers):
        prefix = f"blk.{block}"
        writer.add_tensor(f"{prefix}.attn_norm.weight", norm(args.width))
        writer.add_tensor(f"{prefix}.attn_q.weight", weights(args.width, args.width))
        writer.add_tensor(f"{prefix}.attn_k.weight", weights(kv_width, args.width))
        writer.add_tensor(f"{prefix}.attn_v.weight", weights(kv_width, args.width))
        writer.add_tensor(f"{prefix}.attn_output.weight", weights(args.width, args.width))
        writer.add_tensor(f"{prefix}.ffn_norm.weight", norm(args.width))
        writer.add_tensor(f"{prefix}.ffn_gate.weight", weights(ffn, args.width))
        writer.add_tensor(f"{prefix}.ffn_up.weight", weights(ffn, args.width))
        writer.add_tensor(f"{prefix}.ffn_down.weight", weights(args.width, ffn))
    writer.add_tensor("output_norm.weight", norm(args.width))
    writer.add_tensor("output.weight", weights(len(tokens), args.width))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


if __name__ == "__main__":
    main()
