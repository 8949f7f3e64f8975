"""Store schema constants that code outside ``cache`` needs without importing h5py (the aligner writes
``how`` codes; the faces stage names them in its coverage report)."""

# How each frame's face was found. Stored per frame in ``how``.
HOW = {
    "missing": 0,      # no face found by any step; present=False
    "detector": 1,     # HOG detector on the (downscaled) frame
    "upsampled": 2,    # HOG detector retried with upsampling
    "equalized": 3,    # HOG detector retried on a histogram-equalised frame
    "tracked": 4,      # landmarks tracked from the previous frame's face
    "fallback": 5,     # box carried over from a neighbour frame (no fresh detection)
    "prealigned": 6,   # input was an already aligned face image: resized only
}
