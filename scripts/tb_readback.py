"""Read a `--tensorboard` directory with TensorBoard's own EventAccumulator and print what it
holds as one JSON object: {"scalars": {tag: [[step, value], ...]}, "text": {tag: [[step,
text], ...]}}.

usage: tb_readback.py DIR
"""

import json
import sys

from tensorboard.backend.event_processing import event_accumulator as ea
from tensorboard.util import tensor_util


def main():
    # size_guidance 0: keep every event (the default keeps a sample of 10,000 scalars).
    acc = ea.EventAccumulator(sys.argv[1], size_guidance={ea.SCALARS: 0, ea.TENSORS: 0})
    acc.Reload()
    tags = acc.Tags()
    scalars = {t: [[e.step, e.value] for e in acc.Scalars(t)] for t in tags["scalars"]}
    text = {}
    for t in tags["tensors"]:
        if acc.SummaryMetadata(t).plugin_data.plugin_name != "text":
            continue
        text[t] = [[e.step, tensor_util.make_ndarray(e.tensor_proto).item().decode("utf-8")]
                   for e in acc.Tensors(t)]
    print(json.dumps({"scalars": scalars, "text": text}, ensure_ascii=False))


if __name__ == "__main__":
    main()
