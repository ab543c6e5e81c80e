import json, time
import numpy as np
import torch
from conftest import HOOK

def test_explore(model_dir, corpus, sae_dirs, tmp_path):
    from transformers import AutoTokenizer, GPT2Model
    from transformer_lens import HookedTransformer
    from sae_lens import SAE
    from ingest import IngestOptions, ingest, resolve_source
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    texts = [json.loads(l)["text"] for l in corpus.read_text().splitlines()]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    print("ndocs", len(texts), "lens", [len(i) for i in ids], tok.bos_token_id, tok.pad_token_id, tok.padding_side)
    t=time.time()
    hf = GPT2Model.from_pretrained(str(model_dir)).eval()
    tl = HookedTransformer.from_pretrained_no_processing("gpt2", device="cpu")
    print("load", time.time()-t, tl.cfg.n_layers, tl.cfg.n_ctx)
    t=time.time()
    diffs=[]
    for i in ids:
        x = torch.tensor([[0]+i[:255]])
        with torch.no_grad():
            h = hf(x, output_hidden_states=True).hidden_states[1][0]
        _, c = tl.run_with_cache(x, names_filter=HOOK)
        diffs.append(float((h - c[HOOK][0]).abs().max()))
    print("fwd", time.time()-t, "maxdiff", max(diffs))
    for arch, d in sae_dirs.items():
        sae = SAE.load_from_disk(d)
        print(arch, sae.cfg.metadata.prepend_bos, type(sae))
    for bt in (300, 8192):
        t=time.time()
        r = ingest(resolve_source(None, None, str(sae_dirs["standard"])), IngestOptions(dataset=str(corpus), block_size=16, max_doc_tokens=200, batch_tokens=bt, progress=False), db=tmp_path/f"c{bt}.duckdb")
        print("ingest", bt, time.time()-t, r)
