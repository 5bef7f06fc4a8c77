"""Retrieval evaluation benchmarks, at reduced width (configs/toy/retrieval.yaml by default):

  throughput   ITM re-ranking pairs/s against the batch size (model.itm_scores)
  rerank       batched re-ranking (models.testa_retrieval.rerank_scores) against the published
               loop (one query at a time, its top k_test in chunks of 16): time and score equality
  full         the whole evaluation (evaluation.retrieval.score_matrices) of N videos x N texts
  low_resource peak memory of 96-frame evaluation with and without --low_resource_eval
  shared_kv    one video-to-text ITM pass at the base 96-frame shape with BERT-base: the video's
               cross-attention keys/values computed once (model.itm_scores) against once per pair

The low_resource section replaces the video encoder by a stand-in that returns tokens of the
base 96-frame output shape (1 + 100*48 = 4801 tokens of width 768, the f96 schedule) without
computing them: what --low_resource_eval changes is where and in which dtype those cached tokens
live, and encoding real 96-frame base videos on a CPU would take hours.

  python -m benchmarks.bench_eval --sections throughput,rerank,full,low_resource \
      --out benchmarks/results/eval_cpu.json
"""
import contextlib
import os

import torch
from torch import nn

from benchmarks import common
from configs.load import load_config
from models import create_model
from models.testa_retrieval import rerank_scores
from utils import keep_freed_cpu_memory

PUBLISHED_CHUNK = 16
SECTIONS = ('throughput', 'rerank', 'full', 'low_resource', 'shared_kv')
# Output of the base encoder at 96 frames with the f96 schedule ([4,8]*12 at 224 px): 48 frames
# of 100 patches each, plus the [CLS].
F96_BASE_TOKENS, BASE_WIDTH = 1 + 48 * 100, 768


def build_model(args, extra=()):
    config = load_config(os.path.join(common.REPO_ROOT, args.config), list(args.override) + list(extra))
    torch.manual_seed(0)
    return create_model(config, "retrieval").eval(), config


def fake_texts(count, seed):
    generator = torch.Generator().manual_seed(seed)
    words = ('man woman dog car plays guitar runs across grass stage kitchen cooks talks walks red blue '
             'ball water city street night day camera zooms slowly people dance music').split()
    return [' '.join(words[i] for i in torch.randint(len(words), (12,), generator=generator).tolist())
            for _ in range(count)]


class VideoLoader:
    """Batches (video (B, C, T, H, W), index) like the evaluation loaders, made on the fly."""

    def __init__(self, count, batch, frames, size):
        self.count, self.batch, self.frames, self.size = count, batch, frames, size
        self.sampler = range(count)  # score_matrices sizes its token cache from the sampler

    def __len__(self):
        return -(-self.count // self.batch)

    def __iter__(self):
        for start in range(0, self.count, self.batch):
            stop = min(start + self.batch, self.count)
            generator = torch.Generator().manual_seed(start)
            yield (torch.randn(stop - start, 3, self.frames, self.size, self.size, generator=generator),
                   torch.arange(start, stop))


def encoded_pairs(model, config, count, device):
    """Cached video tokens of `count` random videos, tokenized texts and ITC similarities."""
    loader = VideoLoader(count, 16, config['num_frm_test'], config['image_size'])
    tokens, feats = [], []
    with torch.no_grad():
        for video, _ in loader:
            token, feat = model.encode_video(video.to(device))
            tokens.append(token)
            feats.append(feat)
        input_ids, attention_mask = model.tokenize(fake_texts(count, seed=1))
        _, text_feat = model.encode_text(input_ids, attention_mask)
    tokens, video_feat = torch.cat(tokens), torch.cat(feats)
    return tokens, input_ids, attention_mask, video_feat @ text_feat.T


def section_throughput(args, device):
    model, config = build_model(args)
    model.to(device)
    tokens, input_ids, attention_mask, _ = encoded_pairs(model, config, args.throughput_videos, device)
    generator = torch.Generator().manual_seed(0)
    videos = torch.randint(len(tokens), (args.throughput_pairs,), generator=generator)
    texts = torch.randint(len(input_ids), (args.throughput_pairs,), generator=generator)
    functions = {batch: (lambda batch=batch: model.itm_scores(tokens, videos, input_ids, attention_mask, texts,
                                                                 batch_size=batch))
                 for batch in common.parse_list(args.itm_batches, int)}
    timings = common.time_interleaved(functions, device, runs=args.runs, warmup=args.warmup)
    rows = [dict(section='throughput', itm_batch=batch, pairs=args.throughput_pairs,
                 video_tokens=tokens.shape[1], median_s=timing['median_s'],
                 pairs_per_s=args.throughput_pairs / timing['median_s'])
            for batch, timing in timings.items()]
    return rows


@torch.no_grad()
def published_rerank(model, sims, k, video_tokens, input_ids, attention_mask, video_rows):
    """The published evaluation loop: each query alone, its top k candidates in chunks of 16."""
    scores = torch.full_like(sims, -100.0)
    for row in range(sims.shape[0]):
        top_sims, top_columns = sims[row].topk(min(k, sims.shape[1]))
        for start in range(0, len(top_columns), PUBLISHED_CHUNK):
            columns = top_columns[start:start + PUBLISHED_CHUNK]
            if video_rows:
                tokens = video_tokens[row].unsqueeze(0).expand(len(columns), -1, -1)
                ids, mask = input_ids[columns], attention_mask[columns]
            else:
                tokens = video_tokens[columns]
                ids, mask = input_ids[row].expand(len(columns), -1), attention_mask[row].expand(len(columns), -1)
            logits = model.itm_logits(model.with_enc_token(ids), mask, tokens)
            scores[row, columns] = logits[:, 1].float() + top_sims[start:start + PUBLISHED_CHUNK]
    return scores


def section_rerank(args, device):
    model, config = build_model(args)
    model.to(device)
    tokens, input_ids, attention_mask, sims = encoded_pairs(model, config, args.rerank_n, device)
    k = args.k_test
    rows_all = torch.arange(args.rerank_n)
    results = {}

    def batched():
        results['batched'] = [rerank_scores(model, matrix, k, tokens, input_ids, attention_mask, rows_all,
                                            video_rows, args.k_test_batch_size)
                              for matrix, video_rows in ((sims, True), (sims.T, False))]

    def published():
        results['published'] = [published_rerank(model, matrix, k, tokens, input_ids, attention_mask, video_rows)
                                for matrix, video_rows in ((sims, True), (sims.T, False))]

    timings = common.time_interleaved({'batched': batched, 'published': published}, device,
                                      runs=args.rerank_runs, warmup=0)
    max_diff = max((a - b).abs().max().item() for a, b in zip(results['batched'], results['published']))
    same_order = all(torch.equal(a.argsort(dim=1, descending=True, stable=True),
                                 b.argsort(dim=1, descending=True, stable=True))
                     for a, b in zip(results['batched'], results['published']))
    pairs = 2 * args.rerank_n * min(k, args.rerank_n)
    return [dict(section='rerank', n=args.rerank_n, k_test=k, itm_batch=args.k_test_batch_size, pairs=pairs,
                 video_tokens=tokens.shape[1], batched_s=timings['batched']['median_s'],
                 published_s=timings['published']['median_s'],
                 speedup=timings['published']['median_s'] / timings['batched']['median_s'],
                 max_abs_score_diff=max_diff, identical=max_diff == 0.0, same_ranking=same_order)]


def run_score_matrices(model, config, count, device, frames, size):
    # Imported here: evaluation pulls in the data pipeline, which the other sections, and GPU
    # machines without the video readers, do without.
    from evaluation.retrieval import RetrievalSettings, score_matrices
    loader = VideoLoader(count, config.get('batch_size_test', 16), frames, size)
    return score_matrices(model, loader, fake_texts(count, seed=1), device, contextlib.nullcontext,
                          RetrievalSettings.from_config(config))


def section_full(args, device):
    model, config = build_model(args, [f'k_test={args.k_test}'])
    model.to(device)
    timing = common.time_call(lambda: run_score_matrices(model, config, args.full_n, device,
                                                         config['num_frm_test'], config['image_size']),
                              device, runs=1, warmup=0)
    return [dict(section='full', n=args.full_n, k_test=args.k_test, frames=config['num_frm_test'],
                 image_size=config['image_size'], vision_width=config['vision_width'],
                 median_s=timing['median_s'], median_cpu_s=timing['median_cpu_s'])]


class BaseF96TokenStandIn(nn.Module):
    """Returns (B, 4801, 768) tokens (the base f96 encoder's output shape) from a fixed random
    table shifted per video, so the evaluation caches exactly as much as the real encoder would."""

    def __init__(self, tokens=F96_BASE_TOKENS, width=BASE_WIDTH):
        super().__init__()
        self.embed_dim = width
        self.register_buffer('table', torch.randn(tokens, width, generator=torch.Generator().manual_seed(0)))

    def forward(self, video):
        shift = video.flatten(1).mean(dim=1)[:, None, None]
        return self.table + shift


def section_low_resource(args, device):
    rows = []
    for low_resource in (False, True):
        model, config = build_model(args, [f'vision_width={BASE_WIDTH}', 'num_heads=12', f'k_test={args.low_k_test}',
                                           f'low_resource_eval={low_resource}',
                                           f'k_test_batch_size={args.low_itm_batch}'])
        model.visual_encoder = BaseF96TokenStandIn()
        model.visual_encoder_m = BaseF96TokenStandIn()
        model.to(device)
        common.reset_peak_memory(device)
        before = common.current_memory_mib(device)
        timing = common.time_call(lambda: run_score_matrices(model, config, args.low_n, device, 2,
                                                             config['image_size']), device, runs=1, warmup=0)
        peak = common.peak_memory_mib(device)
        cache_mib = args.low_n * F96_BASE_TOKENS * BASE_WIDTH * 4 / 2 ** 20
        rows.append(dict(section='low_resource', low_resource_eval=low_resource, n=args.low_n, k_test=args.low_k_test,
                         itm_batch=args.low_itm_batch,
                         video_tokens=F96_BASE_TOKENS, fp32_token_cache_mib=cache_mib, peak_mib=peak,
                         before_mib=before, eval_peak_mib=peak - before, median_s=timing['median_s']))
        del model
    if rows[0]['eval_peak_mib'] > 0:
        rows[1]['eval_peak_cut_vs_default'] = 1 - rows[1]['eval_peak_mib'] / rows[0]['eval_peak_mib']
        rows[1]['process_peak_cut_vs_default'] = 1 - rows[1]['peak_mib'] / rows[0]['peak_mib']
    return rows


def section_shared_kv(args, device):
    """A video query's top candidates in one ITM pass, as video-to-text re-ranking scores them."""
    model, _ = build_model(args, ['med_config=configs/med_config.json', f'vision_width={BASE_WIDTH}', 'num_heads=12'])
    model.to(device)
    tokens = BaseF96TokenStandIn().table[None].to(device)
    rows = []
    for pairs in common.parse_list(args.shared_kv_pairs, int):
        input_ids, attention_mask = model.tokenize(fake_texts(pairs, seed=2))
        videos, texts = torch.zeros(pairs, dtype=torch.long), torch.arange(pairs)
        for precision in common.parse_list(args.shared_kv_precisions):
            results, peaks = {}, {}

            def measured(name, score):
                def run():
                    common.reset_peak_memory(device)
                    with torch.no_grad(), common.autocast(device, precision):
                        results[name] = score().float()
                    peaks[name] = common.peak_memory_mib(device)
                return run

            shared = measured('shared', lambda: model.itm_scores(tokens, videos, input_ids, attention_mask, texts,
                                                                 batch_size=pairs))
            per_pair = measured('per_pair', lambda: model.itm_logits(
                model.with_enc_token(input_ids).to(device), attention_mask.to(device), tokens[videos.to(device)])[:, 1])
            timings = common.time_interleaved({'shared': shared, 'per_pair': per_pair}, device,
                                              runs=args.rerank_runs, warmup=1)
            row = dict(section='shared_kv', pairs=pairs, precision=precision, video_tokens=F96_BASE_TOKENS,
                       text_model='BERT-base', shared_s=timings['shared']['median_s'],
                       per_pair_s=timings['per_pair']['median_s'],
                       speedup=timings['per_pair']['median_s'] / timings['shared']['median_s'],
                       max_abs_score_diff=(results['shared'] - results['per_pair']).abs().max().item())
            if device.type == 'cuda':  # on CPU the process RSS says little about one call
                row.update(shared_peak_mib=peaks['shared'], per_pair_peak_mib=peaks['per_pair'])
            rows.append(row)
    return rows


def main():
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument('--sections', default=','.join(SECTIONS), help=f'comma list of {SECTIONS}')
    parser.add_argument('--config', default='configs/toy/retrieval.yaml')
    parser.add_argument('--override', action='append', default=[], help='config key=value (repeatable)')
    parser.add_argument('--itm_batches', default='16,32,64,128,256,512')
    parser.add_argument('--throughput_videos', type=int, default=64)
    parser.add_argument('--throughput_pairs', type=int, default=4096)
    parser.add_argument('--k_test', type=int, default=128)
    parser.add_argument('--k_test_batch_size', type=int, default=128)
    parser.add_argument('--rerank_n', type=int, default=250)
    parser.add_argument('--rerank_runs', type=int, default=1)
    parser.add_argument('--full_n', type=int, default=1000)
    parser.add_argument('--low_n', type=int, default=128, help='videos and texts of the low_resource section')
    parser.add_argument('--low_k_test', type=int, default=8)
    parser.add_argument('--low_itm_batch', type=int, default=16,
                        help='ITM pairs per pass in the low_resource section: each pass holds that many copies '
                             'of a 96-frame video\'s tokens in text-to-video passes, so 128 would add ~1.9 GB '
                             'per pass at base width')
    parser.add_argument('--shared_kv_pairs', default='16', help='comma list: text candidates per shared_kv pass')
    parser.add_argument('--shared_kv_precisions', default='fp32', help='comma list of fp32/bf16/fp16 (shared_kv)')
    args = parser.parse_args()

    device = torch.device(args.device)
    sections = common.parse_list(args.sections)
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise ValueError(f"unknown --sections {sorted(unknown)}; expected some of {SECTIONS}")
    if device.type == 'cpu':
        # Peak RSS needs freed memory handed back; speed wants what the scripts set up.
        if 'low_resource' in sections:
            common.return_freed_memory_to_os()
        else:
            keep_freed_cpu_memory()
    info = common.machine_info(device)
    print(info, flush=True)
    runners = {'throughput': section_throughput, 'rerank': section_rerank, 'full': section_full,
               'low_resource': section_low_resource, 'shared_kv': section_shared_kv}
    rows = []
    for section in sections:
        section_rows = runners[section](args, device)
        for row in section_rows:
            print(row, flush=True)
        rows += section_rows
        common.write_json(args.out, dict(machine=info, args=vars(args), rows=rows))
    for section in sections:
        selected = [row for row in rows if row['section'] == section]
        columns = [key for key in selected[0] if key != 'section']
        common.print_table(selected, columns, title=f'evaluation: {section}')


if __name__ == '__main__':
    main()
