"""Load a GGUF file with llama.cpp (llama-cpp-python) and print, as JSON, how it tokenizes a text
and its next-token logits at every position of the given ids.

usage: llama_cpp_logits.py MODEL.gguf TEXT IDS
  IDS: comma-separated token ids to evaluate (ours: bos + our encoding of TEXT).
Prints {"tokens": llama.cpp's ids for TEXT (add_bos as the file says), "logits": [[...], ...],
"n_vocab": V}. Runs on the CPU with an f32 KV cache and no flash attention, so that what differs
from our f32 forward is the weights' dtype and the order of summation, not a cache in f16.
"""

import json
import sys

import numpy as np
from llama_cpp import Llama, llama_cpp


def main(path, text, ids):
    ids = [int(t) for t in ids.split(",")]
    llm = Llama(model_path=path, n_ctx=max(64, len(ids)), n_batch=max(64, len(ids)),
                logits_all=True, n_threads=2, verbose=False, flash_attn=False,
                type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    tokens = llm.tokenize(text.encode("utf-8"), add_bos=llm._model.add_bos_token(), special=False)
    llm.reset()
    llm.eval(ids)
    logits = np.array(llm.scores[: len(ids)], dtype=np.float32)
    print(json.dumps({"tokens": tokens, "n_vocab": llm.n_vocab(), "logits": logits.tolist()}))


if __name__ == "__main__":
    main(*sys.argv[1:])
