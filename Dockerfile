FROM python:3.11-slim
WORKDIR /app
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
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
EXPOSE 50051
# DATABASE_URL is set by docker-compose.yml; without it the embedded PostgreSQL is used.
CMD ["memory3", "serve", "--host", "0.0.0.0", "--port", "50051"]
