"""The KVSharer policy search: calibration statistics (``calibrate``), layer distances (``distance``), the
greedy loop with its two procedures (``greedy``) and the measured orders (``measured``).
"""
