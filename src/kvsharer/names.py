"""Names of the search's pair orders, in one torch-free place (the search stage, the report and the rules read it).

* ranked orders: the paper's loop walks the layer pairs ranked by K/V distance — ``dissimilar`` (the
  paper), ``similar``, or ``random`` (seeded);
* measured orders: ``measured-<objective>`` — every step measures candidate pairs on the model's output
  and takes the best (:mod:`kvsharer.measured`); ``kl`` scores the next-token distributions, ``cosine`` the
  paper's last-hidden cosine.
"""

RANKED_ORDERS = ("dissimilar", "similar", "random")
MEASURED_ORDERS = {"measured-kl": "kl", "measured-cosine": "cosine"}  # order -> objective
ORDERS = RANKED_ORDERS + tuple(MEASURED_ORDERS)  # display order of the report


def check_order(order: str) -> None:
    if order not in ORDERS:
        raise ValueError(f"unknown pair order {order!r}; choose one of {', '.join(ORDERS)}")
