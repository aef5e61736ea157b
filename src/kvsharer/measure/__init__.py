"""What sharing costs in memory and time: the profile grid (``profile``), the search's scaling with depth and
width (``scaling``) and peak memory (``peakmem``).
"""
