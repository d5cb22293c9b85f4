#!/usr/bin/env bash
# Installs what the llama.cpp rows of benchmarks/decode.py and prefill.py need, into the active environment:
# llama-cpp-python (built from source for this CPU) and the GGUF converter that its source ships
# (vendor/llama.cpp/convert_hf_to_gguf.py + gguf-py). Not a project dependency. Takes about 10-20 minutes
# on 2 cores. Usage: . .venv/bin/activate && bash benchmarks/setup_llamacpp.sh
set -euo pipefail
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
DEST="${LLAMACPP_DIR:-$(dirname "$0")/.llamacpp}"
mkdir -p "$DEST"
cd "$DEST"
if [ ! -d "llama_cpp_python-$VERSION" ]; then
  pip download "llama-cpp-python==$VERSION" --no-deps --no-binary :all: -d . -q
  tar xzf "llama_cpp_python-$VERSION.tar.gz"
fi
pip install -q sentencepiece "numpy<3" "llama_cpp_python-$VERSION/vendor/llama.cpp/gguf-py"
CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=ON}" pip install -q "./llama_cpp_python-$VERSION"
ln -sfn "llama_cpp_python-$VERSION/vendor/llama.cpp" llama.cpp
python -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__)"
