"""Names of the search's pair orders, the metrics, and the report's tables and figures, in one torch-free place
(the search stage, the report and the rules read it).

* ranked orders: the paper's loop walks the layer pairs ranked by K/V distance — ``dissimilar`` (the
  paper), ``similar``, or ``random`` (seeded);
* ``fitted``: the paper's loop over the pairs ranked by how well a fitted K/V map (least squares, closed form) predicts
  the sharing layer's own K/V from what its source stores; the policy then reads through those maps
  (:mod:`kvsharer.cache.kv_maps`: written beside the policy);
* measured orders: ``measured-<objective>`` — every step measures candidate pairs on the model's output
  and takes the best (:mod:`kvsharer.search.measured`); ``kl`` scores the next-token distributions, ``cosine`` the
  paper's last-hidden cosine.
"""

RANKED_ORDERS = ("dissimilar", "similar", "random")
FITTED_ORDERS = ("fitted",)  # their policies come with fitted K/V maps (<policy>.kvmaps.safetensors)
MAP_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")  # model types whose keys the maps un-rotate (rotate_half RoPE)
MEASURED_ORDERS = {"measured-kl": "kl", "measured-cosine": "cosine"}  # order -> objective
ORDERS = RANKED_ORDERS + tuple(MEASURED_ORDERS) + FITTED_ORDERS  # display order of the report
# the paper's order and ours: what the headline (table and figure ppl_vs_rate) and Table 1 show; the order_ablation
# table and figure add the controls (similar, random)
HEADLINE_ORDERS = ("dissimilar",) + tuple(MEASURED_ORDERS) + FITTED_ORDERS


def maps_file(policy_file: str) -> str:
    """Where a fitted order's policy ``<name>.json`` keeps its K/V maps: ``<name>.kvmaps.safetensors``."""
    return policy_file.removesuffix(".json") + ".kvmaps.safetensors"
METRICS = ("euclidean", "cosine", "cka")  # layer distance metrics (kvsharer.search.distance), in display order

# the report: results/tables/<name>.{csv,md} and results/figures/<name>.{png,pdf}
HEADLINE = "ppl_vs_rate"  # the headline table and figure (PPL vs rate of HEADLINE_ORDERS): the DAG writes them first
TABLES = ("ppl_vs_rate", "table1", "order_ablation", "metric_ablation", "threshold_ablation", "acceptance_by_rank",
          "search_cost", "table2_compose", "quantization", "minicache", "search_procedures")
FIGURES = ("ppl_vs_rate", "order_ablation", "distance_heatmap", "acceptance_vs_rank", "threshold_ablation",
           "metric_ablation", "passkey", "search_scaling", "profile_memory", "profile_throughput", "compose",
           "quantization", "minicache", "niah")
# written only when the config has a `serving` section (vLLM, workflow/rules/serving.smk), beside the above:
# results/tables/serving.{csv,md} (serving throughput vs rate) and results/figures/serving.{png,pdf} (tokens/s and
# maximum concurrency vs KV budget)
SERVING_TABLES = ("serving",)
SERVING_FIGURES = ("serving",)


def check_order(order: str) -> None:
    if order not in ORDERS:
        raise ValueError(f"unknown pair order {order!r}; choose one of {', '.join(ORDERS)}")
