"""vLLM (CPU) vs the transformers engine: greedy captions of 8 bait scenes, base model, no steering.
Run with the vLLM virtualenv (recipe in the platform notes), from the repository root:
    PYTHONPATH=. .venv-vllm/bin/python tests/vllm/check_equivalence.py
Not collected by pytest: the vLLM engine (issue 5) will turn it into engine-parametrised tests."""
import os, time
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
from shapeworld.world import make_scenes

def main():
    from vllm import LLM, SamplingParams
    from transformers import AutoProcessor
    path = "models/shapeworld/vlm"
    proc = AutoProcessor.from_pretrained(path)
    scenes = make_scenes("bait", 8, 1234)
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe the image ."}]}]
    prompt = proc.apply_chat_template(chat, add_generation_prompt=True)
    t0 = time.time()
    llm = LLM(model=path, max_model_len=256, gpu_memory_utilization=0.15, max_num_seqs=8, dtype="float32")
    print("engine start %.1f s" % (time.time() - t0), flush=True)
    outs = llm.generate([{"prompt": prompt, "multi_modal_data": {"image": s.image()}} for s in scenes],
                        SamplingParams(temperature=0, max_tokens=40))
    v = [o.outputs[0].text.strip() for o in outs]
    from decoding.transformers_engine import TransformersEngine
    from decoding.request import GenerationRequest, SamplingParams as SP
    e = TransformersEngine(path)
    t = [c.text.strip() for c in e.generate([GenerationRequest.single_turn("describe the image .", [s.image()], sampling=SP(max_tokens=40)) for s in scenes])]
    for a, b in zip(v, t):
        print("SAME" if a == b else "DIFF", repr(a), "|", repr(b))

if __name__ == "__main__":
    main()
