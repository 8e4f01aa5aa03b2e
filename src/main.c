/*
 * main.c - the moe-ep program: parses the subcommand, calls the library,
 * and maps its results to messages and exit statuses.
 *
 * Exit status: 0 success, 1 golden mismatch, 2 invalid usage or input,
 * 3 runtime failure, 128 + signal when SIGINT, SIGTERM or SIGHUP stopped a run.
 */
#include "moe_bench.h"
#include "moe_diff.h"
#include "moe_error.h"
#include "moe_explain.h"
#include "moe_launch.h"
#include "moe_make_layer.h"
#include "moe_run.h"
#include "moe_transport.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum {
    EXIT_MISMATCH = 1,
    EXIT_USAGE = 2,
    EXIT_RUNTIME = 3,
};

static void usage(FILE *out)
{
    fprintf(out,
        "usage: moe-ep COMMAND [options]\n"
        "\n"
        "commands:\n"
        "  run     run one expert-parallel MoE layer on R processes and check it\n"
        "          bit for bit against a single-process golden path\n"
        "  bench   measure the forward time and the all-to-all bandwidth against\n"
        "          the sgemm and memcpy floors of this machine\n"
        "  make-layer  write a MoE layer with seeded random weights as a Hugging\n"
        "          Face checkpoint of a model family\n"
        "  compare compare two .npy files, or two --dump directories stage by\n"
        "          stage, within a tolerance\n"
        "  clean   remove the shared-memory segments in /dev/shm that killed\n"
        "          launchers left behind; --dry-run only lists them\n"
        "  explain run a tiny layer on 2 ranks and narrate each step of expert\n"
        "          parallelism with the numbers of that run\n"
        "  help    show this text\n"
        "\n"
        "moe-ep COMMAND --help describes each command's options.\n");
}

static int exit_status_for(int rc)
{
    return rc == -EINVAL ? EXIT_USAGE : EXIT_RUNTIME;
}

static int command_run_mpi(const struct moe_run_options *options);

static int command_run(int argc, char **argv)
{
    struct moe_run_options options;
    moe_run_options_default(&options);
    int rc = moe_run_parse(&options, argc, argv);
    if (rc == 1) {
        moe_run_usage(stdout);
        return 0;
    }
    if (rc) {
        /* Under mpirun every rank parses the same flags; one message is
         * enough. */
        const char *mpi_rank = getenv("OMPI_COMM_WORLD_RANK");
        if (!mpi_rank || !strcmp(mpi_rank, "0"))
            fprintf(stderr, "moe-ep run: %s\n", moe_error_message());
        return EXIT_USAGE;
    }

    struct moe_run_result result;
    if (options.transport == MOE_TRANSPORT_MPI)
        return command_run_mpi(&options);
    rc = moe_run(&options, &result);
    if (rc) {
        for (int i = 0; i < result.failures; i++)
            fprintf(stderr, "moe-ep run: %s\n", result.failure[i]);
        if (result.launcher_signal) {
            int sig = result.launcher_signal;
            fprintf(stderr, "moe-ep run: stopped by signal %d (%s); all ranks "
                    "were stopped and the shared segment removed\n", sig,
                    strsignal(sig));
            moe_run_result_free(&result);
            return 128 + sig;
        }
        fprintf(stderr, "moe-ep run: %s\n", moe_error_message());
        moe_run_result_free(&result);
        return exit_status_for(rc);
    }

    moe_run_print_report(stdout, &result);
    int status = result.check.equal && result.stage_mismatch < 0 && result.kept_equal &&
                 result.routing_mismatch_step < 0 ? 0 : EXIT_MISMATCH;
    moe_run_result_free(&result);
    return status;
}

/* `moe-ep run --transport mpi`, in every process that mpirun started. Rank
 * 0 prints the report; a rank that fails after the set-up ends the job
 * through MPI_Abort with status 3. */
static int command_run_mpi(const struct moe_run_options *options)
{
    int rc = moe_transport_mpi_init(NULL, NULL);
    if (rc) {
        fprintf(stderr, "moe-ep run: %s\n", moe_error_message());
        return rc == -EINVAL ? EXIT_USAGE : EXIT_RUNTIME;
    }
    struct moe_run_result result;
    int is_root = 0;
    rc = moe_run_mpi(options, &result, &is_root);
    int status = 0;
    if (rc) {
        if (is_root && moe_error_message()[0])
            fprintf(stderr, "moe-ep run: %s\n", moe_error_message());
        status = exit_status_for(rc);
    } else if (is_root) {
        moe_run_print_report(stdout, &result);
        status = result.check.equal && result.stage_mismatch < 0 && result.kept_equal &&
                 result.routing_mismatch_step < 0 ? 0 : EXIT_MISMATCH;
    }
    moe_run_result_free(&result);
    fflush(NULL);
    moe_transport_mpi_finalize();
    return status;
}

static int command_bench(int argc, char **argv)
{
    struct moe_bench_options options;
    moe_bench_options_default(&options);
    int rc = moe_bench_parse(&options, argc, argv);
    if (rc == 1) {
        moe_bench_usage(stdout);
        return 0;
    }
    if (rc) {
        fprintf(stderr, "moe-ep bench: %s\n", moe_error_message());
        return EXIT_USAGE;
    }
    rc = moe_bench(&options, stdout);
    if (rc) {
        fprintf(stderr, "moe-ep bench: %s\n", moe_error_message());
        return exit_status_for(rc);
    }
    return 0;
}

static int command_make_layer(int argc, char **argv)
{
    struct moe_make_layer_options options;
    int rc = moe_make_layer_parse(&options, argc, argv);
    if (rc == 1) {
        moe_make_layer_usage(stdout);
        return 0;
    }
    if (rc == 0)
        rc = moe_make_layer(&options);
    if (rc) {
        fprintf(stderr, "moe-ep make-layer: %s\n", moe_error_message());
        return exit_status_for(rc);
    }
    printf("wrote the %s layer to %s\n", options.family->model_type, options.out_dir);
    return 0;
}

/* Makes a report that could not be written a runtime failure, so that a
 * full disk or a closed pipe is never reported as success. */
static int check_stdout(int status)
{
    if (fflush(stdout) == 0 && !ferror(stdout))
        return status;
    fprintf(stderr, "moe-ep: writing to standard output failed: %s\n",
            strerror(errno));
    return status == EXIT_USAGE ? status : EXIT_RUNTIME;
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        usage(stderr);
        return EXIT_USAGE;
    }
    const char *command = argv[1];
    if (!strcmp(command, "run"))
        return check_stdout(command_run(argc - 2, argv + 2));
    if (!strcmp(command, "bench"))
        return check_stdout(command_bench(argc - 2, argv + 2));
    if (!strcmp(command, "make-layer"))
        return check_stdout(command_make_layer(argc - 2, argv + 2));
    if (!strcmp(command, "compare"))
        return check_stdout(moe_compare_main(argc - 1, argv + 1));
    if (!strcmp(command, "clean"))
        return check_stdout(moe_clean_main(argc - 2, argv + 2));
    if (!strcmp(command, "explain"))
        return check_stdout(moe_explain_main(argc - 2, argv + 2));
    if (!strcmp(command, "help") || !strcmp(command, "-h") ||
        !strcmp(command, "--help")) {
        usage(stdout);
        return check_stdout(0);
    }
    fprintf(stderr, "moe-ep: unknown command '%s'; expected run, bench, make-layer, compare, clean, explain or help\n",
            command);
    return EXIT_USAGE;
}
