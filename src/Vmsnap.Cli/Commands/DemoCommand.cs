using System.CommandLine;

namespace Vmsnap.Cli.Commands;

internal static class DemoCommand
{
    internal static Command Build()
    {
        var command = new Command("demo", "Run the built-in demonstration on a temporary folder (no arguments needed)");
        var json = Cli.JsonOption();
        command.Options.Add(json);
        command.SetHandler((parse, ct) =>
        {
            Console.Error.WriteLine("vmsnap: demo is not built yet");
            return Cli.ExitFailure;
        });
        return command;
    }
}
