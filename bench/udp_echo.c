/*
 * The cost of one crossing into userspace, for bench/crossing.sh.
 *
 *   udp_echo serve PORT                    answer every datagram with itself
 *   udp_echo ask ADDRESS PORT COUNT GAP_US  send COUNT 64-byte datagrams GAP_US apart, one
 *                                          at a time, and print the round trips' p50, p90
 *                                          and minimum in microseconds
 *
 * Kept in C, without a runtime, so that what it measures is the kernel's cost of handing a
 * packet to a program and back, not the program's.
 */
#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static double now_us(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}

static int by_value(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static int serve(int s, int port) {
    struct sockaddr_in me = {.sin_family = AF_INET, .sin_port = htons(port)};
    if (bind(s, (struct sockaddr *)&me, sizeof me) < 0) {
        perror("bind");
        return 1;
    }
    char buf[2048];
    for (;;) {
        struct sockaddr_in from;
        socklen_t len = sizeof from;
        ssize_t n = recvfrom(s, buf, sizeof buf, 0, (struct sockaddr *)&from, &len);
        if (n >= 0)
            sendto(s, buf, n, 0, (struct sockaddr *)&from, len);
    }
}

static int ask(int s, const char *address, int port, int count, int gap_us) {
    struct sockaddr_in to = {.sin_family = AF_INET, .sin_port = htons(port)};
    if (inet_pton(AF_INET, address, &to.sin_addr) != 1) {
        fprintf(stderr, "udp_echo: bad address %s\n", address);
        return 2;
    }
    struct timeval timeout = {.tv_sec = 1};
    setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout);
    double *rtt = calloc(count, sizeof *rtt);
    char buf[2048] = {0};
    int got = 0;
    for (int i = 0; i < count; i++) {
        double start = now_us();
        sendto(s, buf, 64, 0, (struct sockaddr *)&to, sizeof to);
        if (recv(s, buf, sizeof buf, 0) == 64)
            rtt[got++] = now_us() - start;
        usleep(gap_us);
    }
    if (got < count / 2) {
        fprintf(stderr, "udp_echo: only %d of %d answers\n", got, count);
        return 1;
    }
    qsort(rtt, got, sizeof *rtt, by_value);
    printf("%.0f %.0f %.0f\n", rtt[got / 2], rtt[got * 9 / 10], rtt[0]);
    return 0;
}

int main(int argc, char **argv) {
    int s = socket(AF_INET, SOCK_DGRAM, 0);
    if (s < 0) {
        perror("socket");
        return 1;
    }
    if (argc == 3 && strcmp(argv[1], "serve") == 0)
        return serve(s, atoi(argv[2]));
    if (argc == 6 && strcmp(argv[1], "ask") == 0)
        return ask(s, argv[2], atoi(argv[3]), atoi(argv[4]), atoi(argv[5]));
    fprintf(stderr, "usage: udp_echo serve PORT | udp_echo ask ADDRESS PORT COUNT GAP_US\n");
    return 2;
}
