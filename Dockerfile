# syntax=docker/dockerfile:1
# byom-nats: the `byom` CLI; in Kubernetes it runs as `byom agent`.
#   docker build -t byom-nats:0.1.0 .
# The base is pinned by exact tag; pin it by digest too in your registry's
# build (NODE_IMAGE=node:20.20.2-bookworm-slim@sha256:...).
ARG NODE_IMAGE=node:20.20.2-bookworm-slim

# Compile TypeScript with the dev dependencies.
FROM ${NODE_IMAGE} AS build
WORKDIR /src
COPY package.json package-lock.json ./
RUN npm ci --no-audit --no-fund
COPY tsconfig.json tsconfig.build.json ./
COPY src ./src
RUN npx tsc -p tsconfig.build.json

# Production dependencies only.
FROM ${NODE_IMAGE} AS deps
WORKDIR /app
COPY package.json package-lock.json ./
RUN npm ci --omit=dev --no-audit --no-fund && npm cache clean --force

FROM ${NODE_IMAGE} AS runtime
ENV NODE_ENV=production
WORKDIR /app
COPY --from=deps /app/node_modules ./node_modules
COPY --from=build /src/dist ./dist
COPY package.json ./
COPY bin ./bin
# /root stays unlistable but becomes traversable, so the non-root user
# reaches the SSH key Secret mounted at the upstream path /root/.ssh.
RUN ln -s /app/bin/byom.js /usr/local/bin/byom && chmod 0711 /root
# The image's `node` user (uid and gid 1000), as the manifests expect.
USER 1000:1000
EXPOSE 9464
ENTRYPOINT ["byom"]
CMD ["agent"]
