"""Tools over the whole package: `nanops doctor` (data and hyperparameter causes of NaN),
`nanops demo` (plain yolov5 vs nanops train), and the synthetic dataset both use."""
