# One image for every Tally process; the command picks the role.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY core core
COPY schemas schemas
COPY ingest ingest
COPY consumers consumers
COPY query query
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --system --uid 10001 tally
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER tally
ENV TALLY_BIND_HOST=0.0.0.0 PYTHONUNBUFFERED=1
EXPOSE 8000 8001 9101
ENTRYPOINT ["tally"]
