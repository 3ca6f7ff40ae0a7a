# The memory3 service. CPU torch by default (a few hundred MB, not the multi-GB CUDA build):
#   docker build .                                            # CPU
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .   # CUDA
FROM python:3.11.11-slim-bookworm
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
WORKDIR /app
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
RUN pip install --index-url "$TORCH_INDEX" "torch==$TORCH_VERSION"
COPY pyproject.toml README.md ./
COPY proto ./proto
COPY core ./core
COPY service ./service
COPY sdk ./sdk
COPY trainer ./trainer
COPY cli ./cli
COPY migrations ./migrations
RUN pip install .
RUN useradd --create-home memory3
USER memory3
EXPOSE 50051 9464
# DATABASE_URL is set by docker-compose.yml; without it the embedded PostgreSQL is used.
CMD ["memory3", "serve", "--host", "0.0.0.0", "--port", "50051"]
